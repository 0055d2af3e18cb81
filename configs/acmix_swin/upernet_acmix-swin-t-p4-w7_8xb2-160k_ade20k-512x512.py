# UperNet on a Swin-ACMix-T backbone, 160k iterations on ADE20K, 512x512 crops.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. The
# recipe is mmseg 1.2.2's Swin-T UperNet, inherited unchanged except the backbone: AdamW lr 6e-5,
# weight decay 0.01, linear warm-up 1500 iterations then poly decay, 16 images per iteration
# (8 GPUs x 2), drop path 0.3, SyncBN in the heads (plain BN without a process group).
#
# Backbone weights: see configs/acmix_swin/mask-rcnn_acmix-swin-t-p4-w7_fpn_1x_coco.py
# (checkpoints/acmix_swin_tiny_patch4_window7_224.pth, or --cfg-options
# model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
# (_base_ must come before any import: mmengine treats a config whose first statement is an
# import as a 'lazy import' config.)
import os.path as osp

acmix_pretrained = osp.normpath(
    '{{fileDirname}}/../../checkpoints/acmix_swin_tiny_patch4_window7_224.pth')

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,  # mmseg's SwinTransformer arguments are replaced, not merged
        type='acmix_mm.SwinACMix',
        arch='tiny',
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.3,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=(dict(type='Pretrained', checkpoint=acmix_pretrained)
                  if osp.isfile(acmix_pretrained) else None)))

# Swin's decay rules plus ACMix's rate1/rate2 (see the Mask R-CNN config for why).
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'rate1': dict(decay_mult=0.),
            'rate2': dict(decay_mult=0.),
        }))
