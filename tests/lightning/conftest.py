"""Shared fixtures: a tiny COCO set on disk, its config file, and a checkpoint from tools/train.py."""
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import make_coco, make_overfit_coco, overfit_maskrcnn_config, tiny_maskrcnn_config

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


def _dump_eval_config(cfg, tmp_path_factory) -> Path:
    """Keep up to 100 detections per image and report the AR@k items too; write cfg to a file."""
    cfg.model.test_cfg.rcnn.max_per_img = 100
    for key in ('val_evaluator', 'test_evaluator'):
        cfg[key]['metric_items'] = ['mAP', 'mAP_50', 'mAP_s', 'mAP_m', 'AR@100', 'AR@300', 'AR@1000']
    path = tmp_path_factory.mktemp('cfg') / 'tiny_maskrcnn.py'
    cfg.dump(str(path))
    return path


def _train_with_tool(config_file, work_dir):
    run_tool('tools/train.py', config_file, '--work-dir', work_dir, '--accelerator', 'cpu')
    return work_dir, work_dir / 'checkpoints' / 'last.ckpt'


@pytest.fixture(scope='session')
def det_config_file(coco_root, tmp_path_factory):
    return _dump_eval_config(tiny_maskrcnn_config(coco_root, max_iters=2), tmp_path_factory)


@pytest.fixture(scope='session')
def trained(det_config_file, tmp_path_factory):
    """(work_dir, checkpoint) of a 2-iteration tools/train.py run."""
    return _train_with_tool(det_config_file, tmp_path_factory.mktemp('work'))


@pytest.fixture(scope='session')
def overfit_coco_root(tmp_path_factory):
    # 5 images (odd, as above), the same in train and val.
    return make_overfit_coco(tmp_path_factory.mktemp('coco_overfit'), n_images=5)


@pytest.fixture(scope='session')
def overfit_config_file(overfit_coco_root, tmp_path_factory):
    return _dump_eval_config(overfit_maskrcnn_config(overfit_coco_root, max_iters=50), tmp_path_factory)


@pytest.fixture(scope='session')
def overfit_trained(overfit_config_file, tmp_path_factory):
    """(work_dir, checkpoint) of a 50-iteration tools/train.py run that memorises its val split."""
    return _train_with_tool(overfit_config_file, tmp_path_factory.mktemp('work_overfit'))
