# Mask R-CNN + FPN on a Swin-ACMix-T backbone, 1x schedule (12 epochs) on COCO 2017.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. The
# recipe is mmdet 3.3.0's Swin-T Mask R-CNN, inherited unchanged except the backbone: AdamW
# lr 1e-4, weight decay 0.05, 16 images per iteration, 800x1333 input, drop path 0.2.
#
# Backbone weights: the authors' Swin-ACmix-T ImageNet file (as their training script saved it,
# yacs config and optimizer state included: it is read safely, nothing in it runs) goes to
# checkpoints/acmix_swin_tiny_patch4_window7_224.pth (relative to the repository root); its keys
# are converted by acmix_mm.models.checkpoint. Any other path: --cfg-options
# model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH. Without the
# file, init_cfg is None and the backbone starts from the authors' initialisation (it trains,
# but expect far lower accuracy than with ImageNet weights).
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
# (_base_ must come before any import: mmengine treats a config whose first statement is an
# import as a 'lazy import' config.)
import os.path as osp

acmix_pretrained = osp.normpath(
    '{{fileDirname}}/../../checkpoints/acmix_swin_tiny_patch4_window7_224.pth')

model = dict(
    backbone=dict(
        _delete_=True,  # mmdet's SwinTransformer arguments are replaced, not merged
        type='acmix_mm.SwinACMix',
        arch='tiny',
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=(dict(type='Pretrained', checkpoint=acmix_pretrained)
                  if osp.isfile(acmix_pretrained) else None)),
    neck=dict(in_channels=[96, 192, 384, 768]))

# Swin's decay rules (no decay on position-bias tables and norms), plus ACMix's rate1/rate2:
# scalar mixing weights of the two branches, like norm gains. Decay would pull both towards 0,
# i.e. shrink the attention and convolution outputs rather than regularise any weights; the
# authors' ImageNet training (Swin's codebase) exempted every 1-D parameter, these included.
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'rate1': dict(decay_mult=0.),
            'rate2': dict(decay_mult=0.),
        }))
