# RetinaNet R50-FPN 1x on COCO 2017 with ACMix in place of the 3x3 convs of stages 2-4 (c3-c5).
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. It
# enters mmdet's stock ResNet the way DCN does; everything else, including
# init_cfg=Pretrained torchvision://resnet50, is mmdet 3.3.0's config.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        dcn=dict(type='acmix_mm.ACMix', kernel_att=7, head=4),
        stage_with_dcn=(False, True, True, True)))
