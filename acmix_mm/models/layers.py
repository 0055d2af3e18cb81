"""Layer types that acmix_mm registers for other networks' configs.

``ACMix``: the conv layer type (:func:`acmix_mm.ops.build_acmix_conv`) that mmcv's
``build_conv_layer`` builds for ``dict(type='acmix_mm.ACMix')``, and for ``dict(type='ACMix')``
in mmdet's and mmseg's scopes once ``custom_imports=dict(imports=['acmix_mm'])`` has run.
"""
from ..ops import build_acmix_conv
from ..registry import MODELS

MODELS.register_module(name='ACMix', module=build_acmix_conv)
