"""ACMix backbones, one file per architecture family."""
from . import resnet_acmix, swin_acmix  # noqa: F401  (each registers its classes)
