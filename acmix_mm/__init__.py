"""acmix_mm: ACMix backbones for OpenMMLab detectors and segmentors, trained through Lightning.

ACMix is from Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022
(arXiv:2111.14556). Importing the package registers every ACMix model into acmix_mm's
registries, and into mmdet's / mmseg's where those are installed.
"""
from .version import __version__
from . import models  # noqa: F401  (registers the backbones)
from .ops import ACMix

__all__ = ['__version__', 'ACMix']
