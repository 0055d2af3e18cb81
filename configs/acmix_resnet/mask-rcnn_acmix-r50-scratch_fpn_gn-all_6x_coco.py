# Mask R-CNN + FPN on a ResNet-ACMix-50 trained from scratch: GN everywhere, 6x schedule (73 epochs).
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. A
# from-scratch detector needs a recipe made for it: this is mmdet 3.3.0's
# configs/scratch/mask-rcnn_r50-scratch_fpn_gn-all_6x_coco.py (He et al., "Rethinking ImageNet
# Pre-training", ICCV 2019: GN in backbone, neck and heads, 6x schedule, no weight decay on norms)
# with the backbone swapped. On mmdet's 1x schedule with BN, a from-scratch backbone gives a
# poor detector; start from configs/acmix_layer/ or the warm-started acmix_resnet configs instead.
_base_ = 'mmdet::scratch/mask-rcnn_r50-scratch_fpn_gn-all_6x_coco.py'

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(
        _delete_=True,  # mmdet's ResNet arguments are replaced, not merged
        type='acmix_mm.ResNetACMix',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        zero_init_residual=False,
        style='pytorch',
        init_cfg=None))
