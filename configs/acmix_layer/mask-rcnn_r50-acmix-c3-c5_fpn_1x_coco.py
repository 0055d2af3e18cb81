# Mask R-CNN R50-FPN 1x on COCO 2017 with ACMix in place of the 3x3 convs of stages 2-4 (c3-c5).
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. It
# enters mmdet's stock ResNet the way DCN does (configs/dcn/mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py):
# everything else, including init_cfg=Pretrained torchvision://resnet50, is mmdet 3.3.0's config.
# Every layer but the 13 replaced convs starts from the ImageNet weights; the ACMix layers start
# from their own init (one log line reports it).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        dcn=dict(type='acmix_mm.ACMix', kernel_att=7, head=4),
        stage_with_dcn=(False, True, True, True)))
