"""tools/benchmark_trainer.py: the Lightning wrapper against mmengine's Runner on one config."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.lightning.helpers import make_coco, tiny_maskrcnn_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, 'tools', 'benchmark_trainer.py')
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import benchmark_trainer  # noqa: E402


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp('bench_trainer')
    data = make_coco(root / 'coco', n_train=4, n_val=2)
    cfg = tiny_maskrcnn_config(data, max_iters=None, max_epochs=3)
    path = root / 'tiny.py'
    cfg.dump(str(path))
    return str(path)


def test_comparable_config_trains_only(tiny_config):
    cfg = benchmark_trainer.comparable_config(tiny_config, {'train_dataloader.batch_size': 1}, 7)
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=7,
                                 val_interval=benchmark_trainer.NO_CHECKPOINT_STEPS)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader',
                'param_scheduler'):
        assert cfg[key] is None, key
    assert cfg.train_dataloader.batch_size == 1
    assert cfg.default_hooks.checkpoint.save_last is False


def test_both_trainers_run_and_the_ratio_is_printed(tiny_config):
    done = subprocess.run([sys.executable, TOOL, tiny_config, '--iters', '4', '--warmup', '1',
                           '--rounds', '2', '--threads', '1'],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r'^\| (\d+|all) \| ([\d.]+) \| ([\d.]+) \| \**([\d.]+)\** \|$', done.stdout,
                      re.MULTILINE)
    assert [r[0] for r in rows] == ['1', '2', 'all']
    for _, runner, lightning, ratio in rows:
        runner, lightning, ratio = float(runner), float(lightning), float(ratio)
        assert runner > 0 and lightning > 0
        assert ratio == pytest.approx(lightning / runner, rel=0.01, abs=0.002)
    assert re.search(r'wrapper overhead: [+-]\d+\.\d %', done.stdout)
    # The order alternates: round 1 runner first, round 2 lightning first.
    order = re.findall(r'# round (\d) (runner|lightning)', done.stderr)
    assert order == [('1', 'runner'), ('1', 'lightning'), ('2', 'lightning'), ('2', 'runner')]


def test_bad_inputs_fail_before_any_process(tmp_path):
    done = subprocess.run([sys.executable, TOOL, str(tmp_path / 'missing.py')],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    assert 'missing.py' in done.stderr and '# round' not in done.stderr
    done = subprocess.run([sys.executable, TOOL, 'x.py', '--iters', '1'],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert '--iters must be at least 2 (intervals between iterations), got 1' in done.stderr
