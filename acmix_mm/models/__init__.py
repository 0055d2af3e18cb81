"""acmix_mm models. Importing this module registers them (see :mod:`acmix_mm.registry`)."""
from ..registry import mirror_into_openmmlab
from . import backbones, layers  # noqa: F401

mirror_into_openmmlab()
