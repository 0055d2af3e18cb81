"""Datasets and data transforms; importing this package registers them in acmix_mm's registries."""
from .ade_layout import ADE20KLayoutDataset
from .transforms import CheckSegLabels, CheckSegMapSize

__all__ = ['ADE20KLayoutDataset', 'CheckSegLabels', 'CheckSegMapSize']
