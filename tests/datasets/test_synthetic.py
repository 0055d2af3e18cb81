"""The synthetic demo datasets: determinism, COCO/ADE20K validity, occlusion, atomic writes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from acmix_mm.datasets import drawing, synthetic

REPO = Path(__file__).resolve().parents[2]
SIZE = (96, 128)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
    return synthetic.generate_coco_shapes(tmp_path_factory.mktemp('data') / 'coco', num_train=6,
                                          num_val=3, seed=3, size=SIZE)


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    return synthetic.generate_ade_scenes(tmp_path_factory.mktemp('data') / 'ade', num_train=5,
                                         num_val=3, seed=3, size=SIZE)


# -- determinism ------------------------------------------------------------------------------------
@pytest.mark.parametrize('layout', ['coco', 'ade'])
def test_same_seed_gives_identical_files(tmp_path, layout):
    gen = synthetic.generate_coco_shapes if layout == 'coco' else synthetic.generate_ade_scenes
    a = _files(gen(tmp_path / 'a', num_train=3, num_val=2, seed=7, size=SIZE))
    b = _files(gen(tmp_path / 'b', num_train=3, num_val=2, seed=7, size=SIZE))
    c = _files(gen(tmp_path / 'c', num_train=3, num_val=2, seed=8, size=SIZE))
    assert len(a) == 3 + 2 + (3 if layout == 'coco' else 3 + 2 + 1)
    assert a == b
    images = [k for k in a if k.startswith('images/')]
    assert all(a[k] != c[k] for k in images)  # another seed, other pictures


def test_image_does_not_depend_on_split_size(tmp_path):
    small = synthetic.generate_coco_shapes(tmp_path / 's', num_train=2, num_val=1, size=SIZE)
    large = synthetic.generate_coco_shapes(tmp_path / 'l', num_train=4, num_val=1, size=SIZE)
    for name in ('000000.png', '000001.png'):
        assert (small / 'images/train' / name).read_bytes() == \
            (large / 'images/train' / name).read_bytes()


# -- COCO layout --------------------------------------------------------------------------------------
def test_pycocotools_masks_and_boxes_agree_with_polygons(coco_root):
    coco = COCO(str(coco_root / 'annotations/instances_train.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(synthetic.COCO_CLASSES)
    assert len(coco.getImgIds()) == 6
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 6  # at least one shape per image
    for ann in anns:
        mask = coco.annToMask(ann)
        assert mask.shape == SIZE
        assert ann['iscrowd'] == 0 and 1 <= ann['category_id'] <= len(synthetic.COCO_CLASSES)
        assert mask.sum() == ann['area'] >= synthetic.MIN_AREA
        pts = np.concatenate([np.reshape(p, (-1, 2)) for p in ann['segmentation']])
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        np.testing.assert_allclose(ann['bbox'], [x0, y0, x1 - x0, y1 - y0], atol=0.011)
        # The rasterised mask fills its box up to the rasteriser's sub-pixel edge rule.
        ys, xs = np.nonzero(mask)
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
        assert 0 <= x0 and x1 <= SIZE[1] and 0 <= y0 and y1 <= SIZE[0]


def test_visible_masks_are_disjoint_and_match_their_polygons():
    occluded = 0
    for index in range(12):
        image, objects = synthetic.render_coco_image(synthetic._rng(5, 'train', index), *SIZE)
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        cover = np.zeros(SIZE, dtype=int)
        for obj in objects:
            np.testing.assert_array_equal(drawing.rasterize(obj['polygons'], *SIZE), obj['mask'])
            cover += obj['mask']
            if len(obj['polygons'][0]) not in (3, 4, 10, 48):  # not a shape's own polygon
                occluded += 1
        assert cover.max() <= 1  # a pixel shows one shape at most
    assert occluded > 0  # occlusion did happen in these images


def test_mask_to_polygons_round_trip_and_holes():
    rng = np.random.default_rng(0)
    for _ in range(5):
        blob = cv2.resize(rng.random((6, 6)).astype(np.float32), (40, 30)) > 0.6
        polys = drawing.mask_to_polygons(blob)
        if blob.any() and polys is not None:
            np.testing.assert_array_equal(drawing.rasterize(polys, 30, 40), blob)
    ring = np.zeros((20, 20), dtype=bool)
    ring[2:18, 2:18] = True
    ring[8:12, 8:12] = False
    assert drawing.mask_to_polygons(ring) is None


def test_mmdet_coco_dataset_loads_with_a_real_pipeline(coco_root):
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs'),
    ]
    ds = CocoDataset(data_root=str(coco_root), ann_file='annotations/instances_val.json',
                     data_prefix=dict(img='images/val/'), pipeline=pipeline,
                     metainfo=dict(classes=synthetic.COCO_CLASSES), test_mode=False)
    coco = json.loads((coco_root / 'annotations/instances_val.json').read_text())
    assert len(ds) == 3
    for i in range(len(ds)):
        sample = ds[i]
        inputs, data = sample['inputs'], sample['data_samples']
        assert tuple(inputs.shape) == (3, 48, 64)  # 96x128 scaled into 64x64, aspect kept
        n = sum(a['image_id'] == data.img_id for a in coco['annotations'])
        assert len(data.gt_instances) == n
        assert data.gt_instances.masks.masks.shape == (n, 48, 64)
        assert set(data.gt_instances.labels.tolist()) <= set(range(len(synthetic.COCO_CLASSES)))


# -- ADE20K layout ------------------------------------------------------------------------------------
def test_ade_labels_in_range_and_sized_like_images(ade_root):
    for split in ('training', 'validation'):
        images = sorted((ade_root / 'images' / split).glob('*.jpg'))
        labels = sorted((ade_root / 'annotations' / split).glob('*.png'))
        assert [p.stem for p in images] == [p.stem for p in labels]
        assert len(images) == (5 if split == 'training' else 3)
        seen = set()
        for img, lab in zip(images, labels):
            label = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.shape == SIZE
            assert cv2.imread(str(img)).shape == (*SIZE, 3)
            seen |= set(np.unique(label).tolist())
        assert seen <= set(range(len(synthetic.ADE_CLASSES) + 1))
        assert {1, 3} <= seen  # every scene has sky and ground


def test_ade_spikes_are_stars():
    # DATA_VERSION 2: a spike is a star, never a triangle (a triangle's straight edges made
    # 'spike' the class the segmentation demo confused most with 'box'). With one object a scene,
    # the object is drawn last and stays whole, so its outline tells the shape: a star fills
    # about half of its convex hull, a triangle or a rectangle all of it.
    solidity = {}
    for i in range(40):
        _, label = synthetic.render_ade_scene(synthetic._rng(5, 'train', i), 96, 96,
                                              num_objects=(1, 1))
        for name in ('disc', 'box', 'spike'):
            mask = (label == synthetic.ADE_CLASSES.index(name) + 1).astype(np.uint8)
            if mask.any():
                contours = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
                contour = max(contours, key=cv2.contourArea)
                hull_area = cv2.contourArea(cv2.convexHull(contour))
                solidity.setdefault(name, []).append(cv2.contourArea(contour) / hull_area)
    # Seen: stars 0.52-0.58, rectangles 0.88-0.98, circles 0.96-0.99.
    assert len(solidity['spike']) >= 5 and max(solidity['spike']) < 0.7
    assert min(solidity['box']) > 0.8 and min(solidity['disc']) > 0.8


def test_mmseg_ade20k_dataset_loads_with_a_real_pipeline(ade_root):
    from mmengine.registry import init_default_scope

    from acmix_mm.datasets import ADE20KLayoutDataset

    init_default_scope('mmseg')
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='PackSegInputs'),
    ]
    ds = ADE20KLayoutDataset(
        data_root=str(ade_root), data_prefix=dict(img_path='images/training',
                                                  seg_map_path='annotations/training'),
        pipeline=pipeline,
        metainfo=dict(classes=synthetic.ADE_CLASSES, palette=synthetic.ADE_PALETTE))
    assert len(ds) == 5
    assert ds.metainfo['classes'] == synthetic.ADE_CLASSES
    for i in range(len(ds)):
        sample = ds[i]
        seg = sample['data_samples'].gt_sem_seg.data
        assert tuple(seg.shape) == (1, *SIZE)
        stored = cv2.imread(ds.get_data_info(i)['seg_map_path'], cv2.IMREAD_UNCHANGED)
        # reduce_zero_label: stored k -> k - 1, stored 0 -> 255 (ignored)
        expected = np.where(stored == 0, 255, stored.astype(int) - 1)
        np.testing.assert_array_equal(seg[0].numpy(), expected)


# -- writing and arguments ----------------------------------------------------------------------------
def test_refuses_non_empty_target_unless_overwrite(tmp_path):
    out = tmp_path / 'd'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='not empty'):
        synthetic.generate_ade_scenes(out, num_train=1, num_val=1, size=SIZE)
    assert (out / 'keep.txt').read_text() == 'mine'
    synthetic.generate_ade_scenes(out, num_train=1, num_val=1, size=SIZE, overwrite=True)
    assert not (out / 'keep.txt').exists() and (out / 'dataset_info.json').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d']  # no temporary folders left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synthetic.render_coco_image

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, 'render_coco_image', failing)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_coco_shapes(tmp_path / 'd', num_train=4, num_val=1, size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_train=0), 'num_train'),
    (dict(num_val=-1), 'num_val'),
    (dict(num_train=2.5), 'num_train'),
    (dict(seed=-3), 'seed'),
    (dict(size=(16, 64)), 'size'),
    (dict(size=(64, )), 'size'),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.generate_coco_shapes(tmp_path / 'd', **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_drawing_rejects_unknown_kinds():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="'pentagon'"):
        drawing.shape_polygon('pentagon', (5, 5), 3)
    with pytest.raises(ValueError, match='radius'):
        drawing.shape_polygon('circle', (5, 5), 0)
    with pytest.raises(ValueError, match="'plaid'"):
        drawing.background('plaid', 8, 8, rng)


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('make_demo_data', REPO / 'tools/make_demo_data.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(['all', '--out', str(tmp_path), '--num-train', '1', '--num-val', '1',
                     '--size', '64', '64']) == 0
    info = json.loads((tmp_path / 'shapes-ade/dataset_info.json').read_text())
    assert info['layout'] == 'ade20k' and info['size'] == [64, 64]
    assert (tmp_path / 'shapes-coco/annotations/instances_val.json').is_file()
    assert cli.main(['coco', '--out', str(tmp_path / 'shapes-coco')]) == 2
    assert 'not empty' in capsys.readouterr().err
    assert cli.main(['coco', '--out', str(tmp_path / 'x'), '--size', '8', '8']) == 2
    assert 'size' in capsys.readouterr().err


def test_shape_counts_and_sizes_are_recorded_and_checked(tmp_path):
    out = synthetic.generate_coco_shapes(tmp_path / 'big', num_train=2, num_val=1, size=(64, 64),
                                         num_objects=(2, 2), radius_range=(0.2, 0.3))
    info = json.loads((out / 'dataset_info.json').read_text())
    assert (info['num_objects'], info['radius_range']) == ([2, 2], [0.2, 0.3])
    for bad, message in (((0, 3), 'num_objects must be two integers'),
                         ((3, 2), 'num_objects must be two integers')):
        with pytest.raises(ValueError, match=message):
            synthetic.generate_coco_shapes(tmp_path / 'no', num_train=1, num_val=1, num_objects=bad)
    with pytest.raises(ValueError, match=r'radius_range must be two fractions .* got \(0.3, 0.9\)'):
        synthetic.generate_ade_scenes(tmp_path / 'no', num_train=1, num_val=1, radius_range=(0.3, 0.9))
    assert not (tmp_path / 'no').exists()  # refused before anything was written
