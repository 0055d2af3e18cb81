# Cascade Mask R-CNN + FPN on a Swin-ACMix-T backbone, 3x schedule with multi-scale training
# on COCO 2017.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022.
# mmdet 3.3.0 has no Swin Cascade Mask R-CNN config, so this inherits its ResNet-50 cascade
# 3x multi-scale recipe (cascade_rcnn/cascade-mask-rcnn_r50_fpn_ms-3x_coco.py: the COCO train
# set repeated 3 times over 12 epochs = 36 epochs, shorter side 640-800, LR steps at 9 and 11
# of the 12) and applies the Swin-T detection recipe to it: FPN inputs 96/192/384/768, AdamW
# lr 1e-4, weight decay 0.05, the Swin decay rules, drop path 0.2.
#
# Backbone weights: see mask-rcnn_acmix-swin-t-p4-w7_fpn_1x_coco.py
# (checkpoints/acmix_swin_tiny_patch4_window7_224.pth, or --cfg-options
# model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH).
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_ms-3x_coco.py'
# (_base_ must come before any import: mmengine treats a config whose first statement is an
# import as a 'lazy import' config.)
import os.path as osp

acmix_pretrained = osp.normpath(
    '{{fileDirname}}/../../checkpoints/acmix_swin_tiny_patch4_window7_224.pth')

model = dict(
    backbone=dict(
        _delete_=True,  # mmdet's ResNet arguments are replaced, not merged
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

# Swin's decay rules plus ACMix's rate1/rate2 (see the Mask R-CNN config for why).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        _delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'rate1': dict(decay_mult=0.),
            'rate2': dict(decay_mult=0.),
        }))
