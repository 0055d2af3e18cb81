# Semantic FPN on a ResNet-ACMix-50 backbone, 80k iterations on ADE20K, 512x512 crops.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022.
# mmseg 1.2.2 ships Semantic FPN on ADE20K only for 160k iterations; the 80k schedule used by
# backbone papers (PVT, ACMix) is composed here from mmseg's own bases, exactly as mmseg builds
# its 80k configs: SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly decay, 16 images per
# iteration (4 GPUs x 4), SyncBN (plain BN when run without a process group).
#
# Backbone weights: no ImageNet ResNet-ACMix weights were ever released, so the backbone
# warm-starts from torchvision's ImageNet ResNet-50 (mmseg's own base uses a V1c ResNet, a
# different stem): every shared layer loads exactly, the ACMix layers keep their init. As in
# mmseg's ResNet configs, nothing is frozen and SyncBN trains. With your own ResNet-ACMix file:
# --cfg-options model.backbone.init_cfg.checkpoint=PATH.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)

model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,  # the base names open-mmlab://resnet50_v1c, a different network
    backbone=dict(
        _delete_=True,  # mmseg's ResNetV1c arguments are replaced, not merged
        type='acmix_mm.ResNetACMix',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        strides=(1, 2, 2, 2),
        dilations=(1, 1, 1, 1),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
