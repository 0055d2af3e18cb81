"""Seeded synthetic datasets for the CPU demos: COCO-format shapes and ADE20K-layout scenes.

Both layouts are drawn by :mod:`acmix_mm.datasets.drawing` (one shape/texture/background code
path) and written as real files, so mmdet's ``CocoDataset`` and mmseg's ``ADE20KDataset`` read
them exactly as they read COCO and ADE20K:

COCO layout (:func:`generate_coco_shapes`, instance segmentation of :data:`COCO_CLASSES`)::

    OUT/images/train/000000.png ...       OUT/annotations/instances_train.json
    OUT/images/val/000000.png ...         OUT/annotations/instances_val.json
    OUT/dataset_info.json                 (layout, arguments, class names)

Occlusion: shapes are painted in order, later over earlier. An annotation describes what stays
*visible*: its ``segmentation`` polygons are the outlines of the visible part (the shape's own
polygon when nothing covers it), ``area`` is the pixel count of those polygons rasterised by
pycocotools (so ``annToMask(ann).sum() == area`` exactly) and ``bbox`` (xywh) is their extent.
A new shape is rejected when it would hide more than 60 % of an earlier shape, leave it under
:data:`MIN_AREA` pixels, or cut a hole into it (COCO polygons cannot express holes).

ADE20K layout (:func:`generate_ade_scenes`, semantic segmentation of :data:`ADE_CLASSES`)::

    OUT/images/training/ade_train_000000.jpg      OUT/annotations/training/ade_train_000000.png
    OUT/images/validation/ade_val_000000.jpg      OUT/annotations/validation/ade_val_000000.png

Label PNGs are single-channel ``uint8``: 0 = "other" (ignored with ``reduce_zero_label=True``;
here: hexagonal clutter), ``k`` = ``ADE_CLASSES[k - 1]``. A scene is a sky over ground along a
wavy horizon, with clutter (hexagons) and discs (circles), boxes (rectangles) and spikes (stars)
in front.

Determinism: image ``i`` of a split is drawn from ``SeedSequence([seed, split, i])`` alone, so the
same arguments give byte-identical files, and image ``i`` does not change with ``num_train``.
Writing is atomic: everything goes into a temporary sibling folder that is renamed to ``OUT``
at the end, so an interrupted run leaves no half-written dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..checkpoint.atomic import atomic_directory
from . import drawing

__all__ = [
    'COCO_CLASSES', 'ADE_CLASSES', 'ADE_PALETTE', 'MIN_AREA', 'DATA_VERSION',
    'render_coco_image', 'render_ade_scene', 'generate_coco_shapes', 'generate_ade_scenes'
]

#: Detection classes, category ids 1..4 in this order.
COCO_CLASSES = ('circle', 'triangle', 'rectangle', 'star')
#: Segmentation classes, stored labels 1..5 in this order (0 = other/ignored).
ADE_CLASSES = ('sky', 'disc', 'ground', 'box', 'spike')
#: RGB colour per ADE class, for ``metainfo=dict(classes=ADE_CLASSES, palette=ADE_PALETTE)``.
ADE_PALETTE = ((135, 206, 235), (220, 20, 60), (139, 115, 85), (65, 105, 225), (255, 215, 0))
#: Smallest visible area (pixels) of an annotated shape.
MIN_AREA = 40
#: What the generators draw, recorded as ``version`` in ``dataset_info.json``. It goes up
#: whenever the same arguments would draw other files, so that a demo finds stale data (v1: no
#: version recorded, spikes were stars or triangles; v2: spikes are stars).
DATA_VERSION = 2

_SPLIT_CODES = {'train': 0, 'val': 1}
_MAX_HIDDEN = 0.6  # a later shape may hide at most this fraction of an earlier one
_COCO_SHAPES = ('circle', 'triangle', 'rectangle', 'star')
# One outline per object class: a class whose pixels could be a triangle or a star was the one
# the segmentation demo confused most with boxes (docs/benchmarks.md).
_ADE_OBJECTS = {'disc': ('circle', ), 'box': ('rectangle', ), 'spike': ('star', )}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))


def _random_polygon(rng: np.random.Generator, kind: str, height: int, width: int,
                    radius_range: tuple[float, float]) -> np.ndarray:
    """A shape of ``kind`` fully inside the image; radius as a fraction of the shorter side."""
    radius = rng.uniform(*radius_range) * min(height, width)
    cx = rng.uniform(radius + 1, width - radius - 1)
    cy = rng.uniform(radius + 1, height - radius - 1)
    poly = drawing.shape_polygon(
        kind, (cx, cy), radius, angle=rng.uniform(0, 2 * np.pi), aspect=rng.uniform(0.4, 1.0))
    # Stored at 2 decimals: the mask is rasterised from the polygon exactly as it is written.
    return np.round(poly, 2)


def _shape_fill(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A fill for ``mask`` contrasting with what ``canvas`` shows there: ``(H, W, 3)`` float32."""
    h, w = mask.shape
    a = drawing.contrasting_colour(rng, canvas[mask].mean(axis=0))
    b = np.clip(a + rng.uniform(-50, 50, size=3), 0, 255)
    kind = drawing.TEXTURE_KINDS[rng.choice(4, p=[0.55, 0.15, 0.15, 0.15])]
    return drawing.texture(kind, h, w, rng, a, b)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Sensor-like pixel noise, then ``uint8`` RGB."""
    return drawing.to_uint8(image + rng.normal(0.0, 3.0, size=image.shape).astype(np.float32))


def render_coco_image(rng: np.random.Generator, height: int, width: int,
                      num_objects: tuple[int, int] = (1, 5),
                      radius_range: tuple[float, float] = (0.08, 0.25)) -> tuple[np.ndarray, list]:
    """One detection image and its annotations.

    Args:
        rng: the image's generator.
        height, width: image size in pixels.
        num_objects: inclusive range of the number of shapes tried for.
        radius_range: circumradius range, fraction of the shorter image side.

    Returns:
        ``(image, objects)``: ``(H, W, 3)`` uint8 RGB and a list of dicts with ``label`` (index
        into :data:`COCO_CLASSES`), ``polygons`` (list of ``(N, 2)`` arrays, the visible part) and
        ``mask`` (``(H, W)`` bool, visible pixels).
    """
    image = drawing.background(drawing.BACKGROUND_KINDS[rng.integers(4)], height, width, rng)
    target = int(rng.integers(num_objects[0], num_objects[1] + 1))
    objects: list[dict] = []
    for _ in range(10 * target):
        if len(objects) == target:
            break
        label = int(rng.integers(len(_COCO_SHAPES)))
        poly = _random_polygon(rng, _COCO_SHAPES[label], height, width, radius_range)
        mask = drawing.rasterize([poly], height, width)
        if mask.sum() < MIN_AREA:
            continue
        updated = _occlude(objects, mask)
        if updated is None:
            continue
        for obj, (vis, polys) in zip(objects, updated):
            obj['mask'], obj['polygons'] = vis, polys
        drawing.paint(image, mask, _shape_fill(rng, image, mask))
        objects.append(dict(label=label, polygons=[poly], mask=mask, full_area=int(mask.sum())))
    for obj in objects:
        del obj['full_area']
    return _finish(rng, image), objects


def _occlude(objects: list[dict], mask: np.ndarray) -> list | None:
    """Visible masks and polygons of ``objects`` once ``mask`` is painted over them.

    Returns ``None`` when that would break a rule of the module docstring (too hidden, too small,
    or a hole), else one ``(visible_mask, polygons)`` per object.
    """
    out = []
    for obj in objects:
        if not (obj['mask'] & mask).any():
            out.append((obj['mask'], obj['polygons']))
            continue
        vis = obj['mask'] & ~mask
        if vis.sum() < max(MIN_AREA, (1 - _MAX_HIDDEN) * obj['full_area']):
            return None
        polys = drawing.mask_to_polygons(vis)
        if polys is None:
            return None
        out.append((vis, polys))
    return out


def render_ade_scene(rng: np.random.Generator, height: int, width: int,
                     num_objects: tuple[int, int] = (1, 4),
                     radius_range: tuple[float, float] = (0.08, 0.25)) -> tuple[np.ndarray, np.ndarray]:
    """One segmentation scene: sky over ground, clutter (label 0) and objects in front.

    Returns:
        ``(image, label)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 stored labels
        (0 = other, ``k`` = ``ADE_CLASSES[k - 1]``).
    """
    label = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    # A wavy, tilted horizon between 30 % and 70 % of the height.
    horizon = (rng.uniform(0.3, 0.7) * height + rng.uniform(-0.2, 0.2) * (xx - width / 2) +
               rng.uniform(0, 0.05) * height * np.sin(xx / width * 2 * np.pi * rng.uniform(0.5, 2)
                                                      + rng.uniform(0, 2 * np.pi)))
    sky = yy < horizon
    image = drawing.background(('solid', 'gradient')[rng.integers(2)], height, width, rng)
    ground = drawing.background(('noise', 'stripes')[rng.integers(2)], height, width, rng)
    drawing.paint(image, ~sky, ground)
    label[sky] = ADE_CLASSES.index('sky') + 1
    label[~sky] = ADE_CLASSES.index('ground') + 1

    # Clutter first (it may be partly hidden by objects): label 0, ignored by the metric.
    items = [('hexagon', 0)] * int(rng.integers(0, 3))
    object_names = tuple(_ADE_OBJECTS)
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        name = object_names[rng.integers(len(object_names))]
        kinds = _ADE_OBJECTS[name]
        items.append((kinds[rng.integers(len(kinds))], ADE_CLASSES.index(name) + 1))
    for kind, value in items:
        poly = _random_polygon(rng, kind, height, width, radius_range)
        mask = drawing.rasterize([poly], height, width)
        drawing.paint(image, mask, _shape_fill(rng, image, mask))
        label[mask] = value
    return _finish(rng, image), label


def _check_args(num_train: int, num_val: int, seed: int, size: Sequence[int]) -> tuple[int, int]:
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f'seed must be an integer >= 0, got {seed!r}')
    if (len(size) != 2 or not all(isinstance(s, (int, np.integer)) for s in size)
            or min(size) < 32 or max(size) > 4096):
        raise ValueError(f'size must be two integers (height, width) in [32, 4096], got {size!r}')
    return int(size[0]), int(size[1])


def _check_shape_args(num_objects: Sequence[int], radius_range: Sequence[float]
                      ) -> tuple[tuple[int, int], tuple[float, float]]:
    lo, hi = (tuple(num_objects) + (None, None))[:2] if len(num_objects) == 2 else (None, None)
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and 1 <= lo <= hi <= 20):
        raise ValueError(f'num_objects must be two integers 1 <= low <= high <= 20, got {num_objects!r}')
    r = tuple(float(v) for v in radius_range) if len(radius_range) == 2 else ()
    if len(r) != 2 or not 0.02 <= r[0] <= r[1] <= 0.5:
        raise ValueError(f'radius_range must be two fractions 0.02 <= low <= high <= 0.5 of the image side, '
                         f'got {radius_range!r}')
    return (int(lo), int(hi)), (r[0], r[1])


def _write_rgb(path: Path, image: np.ndarray, jpeg_quality: int = 90) -> None:
    bgr = np.ascontiguousarray(image[..., ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix == '.jpg' else []
    if not cv2.imwrite(str(path), bgr, params):
        raise OSError(f'could not write image {path}')


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=None, separators=(',', ':')) + '\n')


def _coco_annotations(objects: list[dict], image_id: int, first_id: int) -> list[dict]:
    anns = []
    for k, obj in enumerate(objects):
        pts = np.concatenate(obj['polygons'])
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        anns.append(
            dict(
                id=first_id + k,
                image_id=image_id,
                category_id=obj['label'] + 1,
                bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                area=float(obj['mask'].sum()),
                iscrowd=0,
                segmentation=[[round(float(v), 2) for v in p.reshape(-1)]
                              for p in obj['polygons']]))
    return anns


def generate_coco_shapes(out_dir: str | os.PathLike, num_train: int = 200, num_val: int = 40,
                         seed: int = 0, size: Sequence[int] = (256, 256),
                         overwrite: bool = False, num_objects: Sequence[int] = (1, 5),
                         radius_range: Sequence[float] = (0.08, 0.25)) -> Path:
    """Write the COCO-format shapes dataset (layout in the module docstring).

    Args:
        out_dir: target folder; must be missing or empty unless ``overwrite``.
        num_train, num_val: images per split (>= 1).
        seed: base seed (>= 0).
        size: ``(height, width)`` of every image, pixels.
        overwrite: replace a non-empty ``out_dir``.
        num_objects: inclusive range of the shapes tried for per image.
        radius_range: circumradius range of a shape, fraction of the shorter image side.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    height, width = _check_args(num_train, num_val, seed, size)
    num_objects, radius_range = _check_shape_args(num_objects, radius_range)
    out_dir = Path(out_dir)
    categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(COCO_CLASSES)]
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / 'annotations').mkdir()
        for split, count in (('train', num_train), ('val', num_val)):
            img_dir = tmp / 'images' / split
            img_dir.mkdir(parents=True)
            images, annotations = [], []
            for i in range(count):
                image, objects = render_coco_image(_rng(seed, split, i), height, width,
                                                   num_objects, radius_range)
                name = f'{i:06d}.png'
                _write_rgb(img_dir / name, image)
                images.append(dict(id=i + 1, file_name=name, height=height, width=width))
                annotations += _coco_annotations(objects, i + 1, len(annotations) + 1)
            _write_json(tmp / 'annotations' / f'instances_{split}.json',
                        dict(info=dict(description=f'acmix_mm synthetic shapes, {split}, seed {seed}'),
                             images=images, annotations=annotations, categories=categories))
        _write_json(tmp / 'dataset_info.json',
                    dict(layout='coco', version=DATA_VERSION, num_train=num_train,
                         num_val=num_val, seed=seed,
                         size=[height, width], num_objects=list(num_objects),
                         radius_range=list(radius_range), classes=list(COCO_CLASSES)))
    return out_dir


def generate_ade_scenes(out_dir: str | os.PathLike, num_train: int = 200, num_val: int = 40,
                        seed: int = 0, size: Sequence[int] = (128, 128),
                        overwrite: bool = False, num_objects: Sequence[int] = (1, 4),
                        radius_range: Sequence[float] = (0.08, 0.25)) -> Path:
    """Write the ADE20K-layout scenes dataset (layout in the module docstring).

    Arguments as :func:`generate_coco_shapes` (``num_objects``: objects in front of the sky and
    ground, clutter aside). Returns ``out_dir`` as a ``Path``.
    """
    height, width = _check_args(num_train, num_val, seed, size)
    num_objects, radius_range = _check_shape_args(num_objects, radius_range)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        for split, folder, count in (('train', 'training', num_train),
                                     ('val', 'validation', num_val)):
            img_dir, ann_dir = tmp / 'images' / folder, tmp / 'annotations' / folder
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(count):
                image, label = render_ade_scene(_rng(seed, split, i), height, width,
                                                num_objects, radius_range)
                stem = f'ade_{split}_{i:06d}'
                _write_rgb(img_dir / f'{stem}.jpg', image)
                if not cv2.imwrite(str(ann_dir / f'{stem}.png'), label):
                    raise OSError(f'could not write label {ann_dir / stem}.png')
        _write_json(tmp / 'dataset_info.json',
                    dict(layout='ade20k', version=DATA_VERSION, num_train=num_train,
                         num_val=num_val, seed=seed,
                         size=[height, width], num_objects=list(num_objects),
                         radius_range=list(radius_range), classes=list(ADE_CLASSES),
                         palette=[list(c) for c in ADE_PALETTE]))
    return out_dir
