"""Tiny COCO data on disk and a tiny stock mmdet Mask R-CNN config, for the Lightning tests.

The images are real PNGs and the annotations a real COCO json, so mmdet's CocoDataset,
its transforms and CocoMetric/pycocotools run exactly as on COCO, only small.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from mmengine.config import Config

CLASSES = ('square', 'bar')
SIZE = 64


def write_coco(root: Path, split: str, n_images: int, seed: int) -> Path:
    """Write ``root/images/<split>_*.png`` and ``root/annotations/instances_<split>.json``."""
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        img = np.full((SIZE, SIZE, 3), 30, np.uint8)
        name = f'{split}_{i:03d}.png'
        for _ in range(int(rng.integers(1, 3))):
            cat = int(rng.integers(1, 3))
            w = int(rng.integers(14, 24)) if cat == 1 else int(rng.integers(24, 34))
            h = w if cat == 1 else int(rng.integers(8, 12))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            colour = (40, 200, 60) if cat == 1 else (220, 80, 40)
            img[y:y + h, x:x + w] = colour
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cat,
                                    bbox=[x, y, w, h], area=float(w * h), iscrowd=0,
                                    segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
        cv2.imwrite(str(root / 'images' / name), img)
        images.append(dict(id=i + 1, file_name=name, width=SIZE, height=SIZE))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(CLASSES)]
    path = root / 'annotations' / f'instances_{split}.json'
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path


def make_coco(root: Path, n_train: int = 4, n_val: int = 3) -> Path:
    write_coco(root, 'train', n_train, seed=0)
    write_coco(root, 'val', n_val, seed=1)
    return root


def make_overfit_coco(root: Path, n_images: int = 5) -> Path:
    """A tiny COCO set whose val split holds the same images and boxes as its train split.

    A model that memorises the train split then scores well above 0 on val, so metric
    comparisons (category mapping, image ids) are checked on non-trivial numbers.
    """
    write_coco(root, 'train', n_images, seed=1)
    write_coco(root, 'val', n_images, seed=1)
    return root


def overfit_maskrcnn_config(data_root: Path, *, max_iters: int = 50) -> Config:
    """``tiny_maskrcnn_config`` with an optimiser that fits the tiny set within a few dozen iterations.

    SGD at lr 0.02 diverges on this randomly initialised model and at 1e-3 needs hundreds of
    iterations; AdamW at 2e-3 with gradient clipping reaches bbox/segm mAP_50 of about 0.6
    after 50 iterations of batch 2 on 5 images (about 40 s on 2 CPU cores).
    """
    cfg = tiny_maskrcnn_config(data_root, max_iters=max_iters)
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-4),
                             clip_grad=dict(max_norm=10.0))
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                                end=min(10, max_iters))]
    return cfg


def tiny_maskrcnn_config(data_root: Path, *, batch_size: int = 2, max_iters: Optional[int] = 2,
                         max_epochs: Optional[int] = None, work_dir: Optional[Path] = None,
                         shuffle: bool = False) -> Config:
    """A stock mmdet Mask R-CNN (ResNet-18 layout, 16 base channels) on the tiny COCO set."""
    import mmdet
    base = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', '_base_',
                                        'models', 'mask-rcnn_r50_fpn.py'))
    model = base.model
    k = len(CLASSES)
    model.backbone.update(depth=18, base_channels=16, init_cfg=None, frozen_stages=-1, norm_eval=False)
    model.neck.update(in_channels=[16, 32, 64, 128], out_channels=16)
    model.rpn_head.update(in_channels=16, feat_channels=16)
    rh = model.roi_head
    rh.bbox_roi_extractor.out_channels = 16
    rh.bbox_head.update(in_channels=16, fc_out_channels=32, num_classes=k)
    rh.mask_roi_extractor.out_channels = 16
    rh.mask_head.update(in_channels=16, conv_out_channels=16, num_classes=k)
    model.train_cfg.rpn.sampler.num = 64
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 32
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    model.test_cfg.rcnn.update(max_per_img=20, score_thr=0.0)
    root = str(data_root)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(type='PackDetInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
    ]
    metainfo = dict(classes=CLASSES, palette=[(0, 255, 0), (255, 0, 0)])

    def dataset(split, pipeline, test_mode):
        return dict(type='CocoDataset', data_root=root, metainfo=metainfo,
                    ann_file=f'annotations/instances_{split}.json', data_prefix=dict(img='images/'),
                    filter_cfg=None if test_mode else dict(filter_empty_gt=True, min_size=1),
                    pipeline=pipeline, test_mode=test_mode)

    val_loader = dict(batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                      dataset=dataset('val', test_pipeline, True))
    evaluator = dict(type='CocoMetric', ann_file=os.path.join(root, 'annotations/instances_val.json'),
                     metric=['bbox', 'segm'])
    if max_epochs is not None:
        train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
    else:
        train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
    cfg = dict(
        default_scope='mmdet',
        model=model.to_dict(),
        train_dataloader=dict(batch_size=batch_size, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=shuffle),
                              dataset=dataset('train', train_pipeline, False)),
        val_dataloader=val_loader,
        test_dataloader=val_loader,
        val_evaluator=evaluator,
        test_evaluator=evaluator,
        train_cfg=train_cfg,
        val_cfg=dict(type='ValLoop'),
        test_cfg=dict(type='TestLoop'),
        optim_wrapper=dict(type='OptimWrapper',
                           optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)],
        visualizer=dict(type='DetLocalVisualizer', name='visualizer'),
        randomness=dict(seed=0),
        lightning=dict(enable_progress_bar=False),
    )
    if work_dir is not None:
        cfg['work_dir'] = str(work_dir)
    return Config(cfg)
