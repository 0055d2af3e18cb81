"""Example batches for a tool: random images with valid targets, or a config's own train data.

What ``tools/benchmark.py`` feeds a model; both give what a dataloader gives (uint8 images and
data samples), for the model's data preprocessor.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from .datasets.paths import check_dataset_paths

__all__ = ['random_batch', 'dataset_batch']


def random_batch(scope: str, model: nn.Module, shape: Tuple[int, int], n: int,
                 gen: torch.Generator) -> dict:
    """``n`` random uint8 images of ``shape`` with random valid targets, as a dataloader gives."""
    import numpy as np
    from mmengine.structures import InstanceData, PixelData

    h, w = shape
    inputs, samples = [], []
    for i in range(n):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0),
                    img_id=i, img_path=f'random_{i}.jpg', flip=False, flip_direction=None)
        if scope == 'mmdet':
            from mmdet.structures import DetDataSample
            from mmdet.structures.mask import BitmapMasks
            num_classes = _num_classes(model, ('roi_head', 'bbox_head'), ('bbox_head',))
            # Three boxes of 1/8 to 1/2 of the image side, inside the image.
            size = torch.rand(3, 2, generator=gen) * 0.375 + 0.125
            corner = torch.rand(3, 2, generator=gen) * (1 - size)
            scale = torch.tensor([w, h], dtype=torch.float32)
            boxes = torch.cat([corner * scale, (corner + size) * scale], dim=1).floor()
            labels = torch.randint(0, num_classes, (3,), generator=gen)
            gt = InstanceData(bboxes=boxes, labels=labels)
            if getattr(model, 'with_mask', False):
                masks = np.zeros((3, h, w), dtype=np.uint8)
                for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                    masks[j, y0:y1, x0:x1] = 1
                gt.masks = BitmapMasks(masks, h, w)
            sample = DetDataSample(metainfo=meta)
            sample.gt_instances = gt
        else:
            from mmseg.structures import SegDataSample
            num_classes = _num_classes(model, ('decode_head',))
            labels = torch.randint(0, num_classes, (1, h, w), generator=gen)
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=labels)
        inputs.append(image)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _num_classes(model: nn.Module, *paths: Sequence[str]) -> int:
    """num_classes of the first head found along ``paths`` (1 when none is found)."""
    for path in paths:
        obj: Any = model
        for attr in path:
            obj = getattr(obj, attr, None)
            if isinstance(obj, (nn.ModuleList, list, tuple)):  # cascade heads: the first stage
                obj = obj[0] if len(obj) else None
            if obj is None:
                break
        if obj is not None and isinstance(getattr(obj, 'num_classes', None), int):
            return obj.num_classes
    return 1


def dataset_batch(cfg, shape: Optional[Tuple[int, int]], n: int) -> dict:
    """The first ``n`` samples of the config's train dataset through its train pipeline.

    With ``shape`` = (H, W), a ``Resize`` to exactly that size (boxes, masks and label maps
    follow) runs just before the packing transform.
    """
    from mmengine.config import ConfigDict
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATASETS

    loader = cfg.get('train_dataloader')
    if not loader or 'dataset' not in loader:
        raise ValueError('--data dataset needs a config with train_dataloader.dataset')
    dataset_cfg = copy.deepcopy(loader['dataset'].to_dict()
                                if hasattr(loader['dataset'], 'to_dict') else loader['dataset'])
    check_dataset_paths(dataset_cfg, 'train_dataloader.dataset')
    if shape is not None:
        inner = dataset_cfg
        while 'pipeline' not in inner and isinstance(inner.get('dataset'), dict):
            inner = inner['dataset']  # wrappers such as RepeatDataset / ConcatDataset's first
        pipeline = list(inner.get('pipeline') or [])
        packs = [i for i, t in enumerate(pipeline) if str(t.get('type', '')).startswith('Pack')]
        if not packs:
            raise ValueError('--data dataset --shape: the train pipeline has no Pack* transform '
                             'to insert the resize before')
        pipeline.insert(packs[-1], dict(type='Resize', scale=(shape[1], shape[0]),
                                        keep_ratio=False))
        inner['pipeline'] = pipeline
    dataset = DATASETS.build(ConfigDict(dataset_cfg))
    if len(dataset) < n:
        raise ValueError(f'--batch {n}: the train dataset has only {len(dataset)} samples')
    return pseudo_collate([dataset[i] for i in range(n)])
