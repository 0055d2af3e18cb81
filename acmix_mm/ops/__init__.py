"""Operators: the ACMix layer, its conv-layer form, and its sliding-window attention kernels."""
from .acmix import ACMix, ShiftConv2d
from .conv_layer import ACMixConv2d, build_acmix_conv

__all__ = ['ACMix', 'ACMixConv2d', 'ShiftConv2d', 'build_acmix_conv']
