# UperNet R50-V1c, 80k iterations on ADE20K (512x512 crops), with ACMix in place of the 3x3 convs
# of stages 2-4 (c3-c5).
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. It
# enters mmseg's stock ResNetV1c the way DCN does; everything else, including
# pretrained='open-mmlab://resnet50_v1c', is mmseg 1.2.2's config.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(
        dcn=dict(type='acmix_mm.ACMix', kernel_att=7, head=4),
        stage_with_dcn=(False, True, True, True)))
