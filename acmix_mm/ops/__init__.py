"""Operators: the ACMix layer and its sliding-window attention kernels."""
from .acmix import ACMix

__all__ = ['ACMix']
