"""acmix_mm: ACMix backbones for OpenMMLab detectors and segmentors, trained through Lightning.

Importing the package registers every ACMix module into acmix_mm's registries (and into
mmdet's / mmseg's where those are installed).
"""
from .version import __version__

__all__ = ['__version__']
