"""Validation transforms for semantic segmentation pipelines.

mmseg's loaders accept malformed data silently: a label PNG whose size differs from its image is
resized or cropped along with it, and a label value beyond the configured classes only surfaces
later as a CUDA assert, a NaN loss or a wrong metric. These transforms stop the pipeline at the
sample that is wrong, with an error that names the file and the bad value.

Place them right after mmseg's ``LoadAnnotations`` in every pipeline that loads labels::

    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='acmix_mm.CheckSegMapSize'),
    dict(type='acmix_mm.CheckSegLabels', num_classes=150),

They change nothing in ``results``; a valid sample passes through untouched.
"""
from __future__ import annotations

import numpy as np
from mmcv.transforms import BaseTransform

from ..registry import TRANSFORMS

__all__ = ['CheckSegMapSize', 'CheckSegLabels']

# How many distinct bad values an error message lists before it summarises the rest.
_MAX_LISTED_VALUES = 8


def _seg_map(results: dict, transform: str) -> np.ndarray:
    """The loaded label map of ``results``; a clear error when nothing was loaded yet."""
    if 'gt_seg_map' not in results:
        raise ValueError(f'{transform} found no "gt_seg_map" in the sample of '
                       f'{results.get("img_path", "<unknown image>")!r}: place it after '
                       f"mmseg's LoadAnnotations in the pipeline")
    return results['gt_seg_map']


@TRANSFORMS.register_module()
class CheckSegMapSize(BaseTransform):
    """Raise when a label map's size differs from its image's size as loaded from disk.

    Compares ``gt_seg_map`` (H, W) with ``ori_shape`` (set by ``LoadImageFromFile``, and kept
    unchanged by every resize), so it may stand anywhere after ``LoadAnnotations``, also in test
    pipelines that resize the image before loading the labels.
    """

    def transform(self, results: dict) -> dict:
        seg_map = _seg_map(results, type(self).__name__)
        if 'ori_shape' not in results:
            raise ValueError(f'{type(self).__name__} found no "ori_shape" in the sample of '
                           f'{results.get("seg_map_path", "<unknown label map>")!r}: place it '
                           f'after LoadImageFromFile in the pipeline')
        image_hw = tuple(int(s) for s in results['ori_shape'][:2])
        if seg_map.ndim != 2 or tuple(seg_map.shape) != image_hw:
            raise ValueError(
                f'label map {results.get("seg_map_path")!r} has shape {tuple(seg_map.shape)} '
                f'but its image {results.get("img_path")!r} is {image_hw[0]}x{image_hw[1]} '
                f'(HxW); a label map must be a single-channel PNG of the same height and width')
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


@TRANSFORMS.register_module()
class CheckSegLabels(BaseTransform):
    """Raise when a label map holds a value that is neither a class index nor the ignore index.

    Checks ``gt_seg_map`` as ``LoadAnnotations`` left it: with ``reduce_zero_label=True`` (ADE20K)
    the stored values 1..K have become class indices 0..K-1 and the stored 0 has become 255, so
    the error message reports both the loaded value and the value stored in the file.

    Args:
        num_classes: K, the number of classes of the model's decode head; loaded values must be
            in ``[0, K)`` or equal ``ignore_index``.
        ignore_index: the label that the loss and the metric skip (mmseg's default 255).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f'ignore_index must be an int, got {ignore_index!r}')
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        seg_map = _seg_map(results, type(self).__name__)
        values = np.unique(seg_map)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
        if bad.size:
            raise ValueError(self._message(results, seg_map, bad))
        return results

    def _message(self, results: dict, seg_map: np.ndarray, bad: np.ndarray) -> str:
        listed = [int(v) for v in bad[:_MAX_LISTED_VALUES]]
        more = f' (and {bad.size - len(listed)} more)' if bad.size > len(listed) else ''
        num_pixels = int(np.isin(seg_map, bad).sum())
        message = (f'label map {results.get("seg_map_path")!r} holds label value(s) {listed}{more} '
                   f'in {num_pixels} pixel(s); allowed: class indices 0..{self.num_classes - 1} '
                   f'and the ignore index {self.ignore_index}')
        if results.get('reduce_zero_label', False):
            # LoadAnnotations subtracted 1 (uint8 arithmetic), so the file holds value + 1.
            stored = [(v + 1) % 256 for v in listed]
            message += (f'. With reduce_zero_label=True these are the stored values {stored}; '
                        f'the file may hold 0 (ignored) and 1..{self.num_classes} '
                        f'(ADE20K convention)')
        return message

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, '
                f'ignore_index={self.ignore_index})')
