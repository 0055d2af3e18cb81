"""Shared fixtures: a tiny COCO set on disk, its config file, and a checkpoint from tools/train.py."""
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import make_coco, tiny_maskrcnn_config

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args, timeout=600):
    """Run a tools/ script in a fresh interpreter; returns the CompletedProcess (check=True)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


@pytest.fixture(scope='session')
def coco_root(tmp_path_factory):
    # 5 val images: an odd count, so that padded distributed evaluation would show.
    return make_coco(tmp_path_factory.mktemp('coco'), n_train=4, n_val=5)


@pytest.fixture(scope='session')
def det_config_file(coco_root, tmp_path_factory):
    cfg = tiny_maskrcnn_config(coco_root, max_iters=2)
    cfg.model.test_cfg.rcnn.max_per_img = 100
    # AR@k is non-zero even for a barely trained model, so comparisons below compare real numbers.
    for key in ('val_evaluator', 'test_evaluator'):
        cfg[key]['metric_items'] = ['mAP', 'mAP_50', 'mAP_s', 'mAP_m', 'AR@100', 'AR@300', 'AR@1000']
    path = tmp_path_factory.mktemp('cfg') / 'tiny_maskrcnn.py'
    cfg.dump(str(path))
    return path


@pytest.fixture(scope='session')
def trained(det_config_file, tmp_path_factory):
    """(work_dir, checkpoint) of a 2-iteration tools/train.py run."""
    work_dir = tmp_path_factory.mktemp('work')
    run_tool('tools/train.py', det_config_file, '--work-dir', work_dir, '--accelerator', 'cpu')
    return work_dir, work_dir / 'checkpoints' / 'last.ckpt'
