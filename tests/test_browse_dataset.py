"""tools/browse_dataset.py on the synthetic demo datasets, through mmdet's/mmseg's real code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.browse_dataset import main

REPO = Path(__file__).resolve().parents[1]
COCO_CONFIG = str(REPO / 'configs/demo/maskrcnn_acmix-r26-slim_shapes-coco.py')
ADE_CONFIG = str(REPO / 'configs/demo/semfpn_acmix-r26-slim_shapes-ade.py')


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
    from acmix_mm.datasets.synthetic import generate_coco_shapes
    return generate_coco_shapes(tmp_path_factory.mktemp('data') / 'coco', num_train=3, num_val=2,
                                seed=0, size=(96, 96))


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    from acmix_mm.datasets.synthetic import generate_ade_scenes
    return generate_ade_scenes(tmp_path_factory.mktemp('data') / 'ade', num_train=3, num_val=2,
                               seed=0, size=(64, 64))


def printed(text: str, out: Path) -> list:
    """The tool's own stdout lines (pycocotools prints 'creating index...' too)."""
    return [line for line in text.splitlines() if line.startswith((str(out), 'wrote '))]


def read_rgb(path) -> np.ndarray:
    import mmcv
    return mmcv.imread(str(path), channel_order='rgb').astype(np.int64)


def assert_boxes_drawn(src: np.ndarray, png: np.ndarray, boxes: list, scale: float) -> None:
    """``png`` is ``src`` with the COCO ``boxes`` (xywh, times ``scale``) drawn on it, nothing else."""
    assert png.shape == src.shape
    changed = np.abs(png - src).max(axis=2) > 0
    boxes = [[v * scale for v in box] for box in boxes]
    x, y, w, h = (int(round(v)) for v in boxes[0])
    assert changed[y:y + h + 1, x:x + w + 1].mean() > 0.5  # outline and mask of the first box
    near = np.zeros_like(changed)
    margin = int(4 * scale)
    for x, y, w, h in boxes:
        near[max(int(y) - margin, 0):int(y + h) + margin + 1,
             max(int(x) - margin, 0):int(x + w) + margin + 1] = True
    assert (~near).sum() > 0.1 * near.size
    # Far from every box only class-name tags that run past a small box change pixels: the
    # image itself is drawn unchanged, in its own colours (RGB, not BGR).
    assert changed[~near].mean() < 0.03


def test_coco_raw_draws_boxes_on_the_stored_images(coco_root, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main([COCO_CONFIG, '--data-root', str(coco_root), '--out', str(out), '--num', '2']) == 0
    lines = printed(capsys.readouterr().out, out)
    assert lines == [str(out / 'train' / '000000.png'), str(out / 'train' / '000001.png'),
                     f'wrote 2 image(s) to {out / "train"}']
    assert sorted(p.name for p in (out / 'train').iterdir()) == ['000000.png', '000001.png']

    coco = json.loads((coco_root / 'annotations/instances_train.json').read_text())
    for image in coco['images'][:2]:
        src = read_rgb(coco_root / 'images/train' / image['file_name'])
        png = read_rgb(out / 'train' / image['file_name'])
        assert png.shape == (image['height'], image['width'], 3)
        assert_boxes_drawn(src, png, [a['bbox'] for a in coco['annotations']
                                      if a['image_id'] == image['id']], scale=1.0)


def test_coco_show_pipeline_draws_on_the_resized_image(coco_root, tmp_path, capsys):
    import mmcv

    out = tmp_path / 'out'
    assert main([COCO_CONFIG, '--data-root', str(coco_root), '--out', str(out), '--split', 'val',
                 '--show-pipeline']) == 0
    assert printed(capsys.readouterr().out, out)[-1] == f'wrote 2 image(s) to {out / "val"}'
    coco = json.loads((coco_root / 'annotations/instances_val.json').read_text())
    for image in coco['images']:
        png = read_rgb(out / 'val' / image['file_name'])
        # The demo's Resize(scale=(128, 128), keep_ratio=True) takes the 96 x 96 images to 128.
        assert png.shape == (128, 128, 3)
        src = mmcv.imresize(read_rgb(coco_root / 'images/val' / image['file_name']).astype(np.uint8),
                            (128, 128)).astype(np.int64)
        # The val pipeline loads annotations after Resize (at 96 px): they are drawn scaled.
        assert_boxes_drawn(src, png, [a['bbox'] for a in coco['annotations']
                                      if a['image_id'] == image['id']], scale=128 / 96)


@pytest.mark.parametrize('show_pipeline', [False, True])
def test_ade_val_labels_in_the_dataset_palette(ade_root, tmp_path, capsys, show_pipeline):
    import mmcv
    from acmix_mm.datasets.synthetic import ADE_PALETTE

    out = tmp_path / 'out'
    assert main([ADE_CONFIG, '--data-root', str(ade_root), '--out', str(out), '--split', 'val',
                 '--num', '5'] + ['--show-pipeline'] * show_pipeline) == 0
    assert printed(capsys.readouterr().out, out)[-1] == f'wrote 2 image(s) to {out / "val"}'
    alpha = 0.8  # SegLocalVisualizer's default, which mmseg's default_runtime keeps
    # The val pipeline resizes the 64 px scenes to its 128 px scale and loads labels after that.
    size = 128 if show_pipeline else 64
    seen = set()
    for stem in ('ade_val_000000', 'ade_val_000001'):
        image = read_rgb(ade_root / 'images/validation' / f'{stem}.jpg').astype(np.uint8)
        stored = mmcv.imread(str(ade_root / 'annotations/validation' / f'{stem}.png'), flag='unchanged')
        image = mmcv.imresize(image, (size, size)).astype(np.int64)
        stored = mmcv.imresize(stored, (size, size), interpolation='nearest')
        png = read_rgb(out / 'val' / f'{stem}.png')
        assert png.shape == (size, size, 3)
        for value in np.unique(stored):
            where = stored == value
            # reduce_zero_label: stored k is class k - 1 in ADE_PALETTE; stored 0 is ignored (255),
            # which SegLocalVisualizer leaves black, i.e. darkens.
            colour = np.array(ADE_PALETTE[value - 1] if value else (0, 0, 0))
            expected = (image * (1 - alpha) + colour * alpha).astype(np.uint8)
            match = (np.abs(png[where] - expected[where]).max(axis=1) <= 1).mean()
            # All but the class-name tags the visualiser writes on each region.
            assert match > 0.8 or where.sum() < 0.05 * where.size, (stem, value, match)
            seen.add(int(value))
    assert len(seen - {0}) >= 2


def test_missing_split_exits_2(coco_root, tmp_path, capsys):
    from mmengine.config import Config

    cfg = Config.fromfile(COCO_CONFIG)
    cfg.pop('val_dataloader')
    path = tmp_path / 'no_val.py'
    cfg.dump(str(path))
    out = tmp_path / 'out'
    assert main([str(path), '--data-root', str(coco_root), '--split', 'val', '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'browse_dataset.py: error: the config has no val_dataloader'
    assert not out.exists()


def test_missing_data_folder_exits_2_and_writes_nothing(tmp_path):
    # As a script, from another folder: tools/ is not a package, demo.py is loaded by path.
    missing, out = tmp_path / 'nowhere', tmp_path / 'out'
    proc = subprocess.run([sys.executable, str(REPO / 'tools/browse_dataset.py'), COCO_CONFIG,
                           '--data-root', str(missing), '--out', str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('browse_dataset.py: error: train_dataloader.dataset.data_root=')
    assert str(missing) in last and 'is not a directory' in last
    assert not out.exists()


def test_missing_annotation_file_names_it(coco_root, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main([COCO_CONFIG, '--data-root', str(coco_root), '--out', str(out), '--cfg-options',
                 'train_dataloader.dataset.ann_file=annotations/absent.json']) == 2
    err = capsys.readouterr().err
    assert 'train_dataloader.dataset.ann_file' in err and 'absent.json' in err
    assert not out.exists()


@pytest.mark.parametrize('argv', [['--num', '0'], ['--split', 'holdout']])
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as info:
        main([COCO_CONFIG, '--out', str(out), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert ('--num: must be >= 1, got 0' in err) if argv[0] == '--num' else ('invalid choice' in err)
    assert not out.exists()


def test_missing_config_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / 'absent.py'), '--out', str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.strip() == (
        f'browse_dataset.py: error: config file not found: {tmp_path / "absent.py"}')
    assert not os.path.exists(tmp_path / 'out')
