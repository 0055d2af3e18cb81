# RetinaNet + FPN on a ResNet-ACMix-50 backbone, 1x schedule (12 epochs) on COCO 2017.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. The
# recipe is mmdet 3.3.0's ResNet-50 RetinaNet, inherited unchanged except the backbone:
# SGD lr 0.01 (16 images per iteration), momentum 0.9, weight decay 1e-4, 800x1333 input.
#
# Backbone weights: see mask-rcnn_acmix-r50_fpn_1x_coco.py (checkpoints/resnet_acmix50_imagenet.pth,
# used when present; otherwise the backbone trains from its own init with nothing frozen).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
# (_base_ must come before any import: mmengine treats a config whose first statement is an
# import as a 'lazy import' config.)
import os.path as osp

acmix_pretrained = osp.normpath('{{fileDirname}}/../../checkpoints/resnet_acmix50_imagenet.pth')

model = dict(
    backbone=dict(
        _delete_=True,  # mmdet's ResNet arguments are replaced, not merged
        type='acmix_mm.ResNetACMix',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1 if osp.isfile(acmix_pretrained) else -1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=osp.isfile(acmix_pretrained),
        style='pytorch',
        init_cfg=(dict(type='Pretrained', checkpoint=acmix_pretrained)
                  if osp.isfile(acmix_pretrained) else None)))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
