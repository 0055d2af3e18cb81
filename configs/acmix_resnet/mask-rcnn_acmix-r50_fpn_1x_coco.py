# Mask R-CNN + FPN on a ResNet-ACMix-50 backbone, 1x schedule (12 epochs) on COCO 2017.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. The
# recipe is mmdet 3.3.0's ResNet-50 Mask R-CNN, inherited unchanged except the backbone:
# SGD lr 0.02 (16 images per iteration), momentum 0.9, weight decay 1e-4, 800x1333 input.
#
# Backbone weights: no ImageNet ResNet-ACMix weights were ever released, so the backbone
# warm-starts from torchvision's ImageNet ResNet-50: every layer the two networks share loads
# exactly, the 16 ACMix layers keep their init (one log line reports it), and the fine-tuning
# recipe is mmdet's (BN statistics frozen) but for frozen_stages: 0 (the stem) instead of
# mmdet's 1, because stage 1's three ACMix layers have no ImageNet weights and freezing them
# would fix them at their random init. With your own ResNet-ACMix ImageNet file:
# --cfg-options model.backbone.init_cfg.checkpoint=PATH model.backbone.frozen_stages=1.
# Every 3x3 conv is ACMix here; configs/acmix_layer/ keeps stage 1 a pretrained conv and is
# the better start (docs/configs.md).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,  # mmdet's ResNet arguments are replaced, not merged
        type='acmix_mm.ResNetACMix',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=0,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001))
