"""Datasets and data transforms; importing this package registers them in acmix_mm's registries.

``synthetic`` writes the seeded demo datasets (COCO-format shapes, ADE20K-layout scenes) drawn by
``drawing``; ``ade_layout`` and ``transforms`` read and check ADE20K-layout data; ``validation``
checks built datasets (empty ones) and COCO files (``CheckedCocoDataset``: broken JSON, missing or
garbage images, counted skipped annotations).
"""
from .ade_layout import ADE20KLayoutDataset
from .synthetic import (ADE_CLASSES, ADE_PALETTE, COCO_CLASSES, generate_ade_scenes,
                        generate_coco_shapes)
from .transforms import CheckSegLabels, CheckSegMapSize
from .validation import validate_dataset

__all__ = [
    'ADE20KLayoutDataset', 'CheckSegLabels', 'CheckSegMapSize', 'ADE_CLASSES', 'ADE_PALETTE',
    'COCO_CLASSES', 'generate_ade_scenes', 'generate_coco_shapes', 'validate_dataset'
]
