"""After a NaN/Inf stop, the last good checkpoint is complete, finite and usable.

The run: the tiny Mask R-CNN on 4 training images (2 batches of 2 per epoch), 3 epochs, a
validation and a checkpoint after every epoch. ``NonFiniteAtStepMaskRCNN`` (tests/lightning/
nonfinite.py, mmdet's MaskRCNN otherwise) makes the loss of training step 5 (epoch 2, batch 1)
``inf`` or ``nan``. Steps 0-4 are good, so the files on disk when the run stops are
``epoch=0-step=2.ckpt``, ``epoch=1-step=4.ckpt`` and ``last.ckpt`` (= step 4), while the weights
in memory have moved on by one more good step (step 4's update): a checkpoint written when the
exception stops the run would hold those, and is detectable.

Checked: the stop names the step; nothing is written from the bad step on; the newest epoch
checkpoint and last.ckpt hold exactly the weights after step 3 (global_step 4), all finite,
with optimiser, loop and schedule state; they evaluate to finite metrics through
``acmix_mm.lightning.test`` and ``tools/test.py``, and resume (API and ``tools/train.py
--resume``) to the end of training.

The last test is a realistic divergence rather than an injected one: an enormous learning rate
at the last step of an epoch turns a weight infinite while that step's loss is still finite.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from acmix_mm.lightning import NonFiniteLossError, train
from acmix_mm.lightning import test as evaluate_checkpoint

from . import nonfinite  # noqa: F401  (registers NonFiniteAtStepMaskRCNN in mmdet's MODELS)
from .conftest import run_tool
from .helpers import tiny_maskrcnn_config

BAD_STEP = 5  # epoch 2, batch 1
GOOD_FILES = {'epoch=0-step=2.ckpt', 'epoch=1-step=4.ckpt', 'last.ckpt'}
NEWEST_EPOCH_FILE = 'epoch=1-step=4.ckpt'
LAST_GOOD_STEP = 4  # global_step stored in the newest checkpoint (4 optimiser steps done)


def _ckpt_listing(folder: Path) -> Dict[str, Tuple[int, int]]:
    """{file name: (mtime_ns, size)} of the checkpoints in ``folder``."""
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob('*.ckpt')}


class Recorder(Callback):
    """Snapshots the weights after every optimiser step and logs batch starts and checkpoint saves.

    Attributes:
        weights: {global_step after the step: the wrapped model's state_dict (cloned)}.
        events: ('batch', global_step) at each batch start, ('save', global_step) at each
            checkpoint dump, ('exception', name) when Lightning reports the stop.
        listing_at_bad_step: the checkpoint folder's listing when the bad batch starts.
    """

    def __init__(self, ckpt_dir: Path, bad_step: int = -1) -> None:
        self.ckpt_dir = ckpt_dir
        self.bad_step = bad_step
        self.weights: Dict[int, Dict[str, torch.Tensor]] = {}
        self.events: List[Tuple[str, Any]] = []
        self.first_batch_weights: Dict[str, torch.Tensor] = {}
        self.listing_at_bad_step: Dict[str, Tuple[int, int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.events or all(kind != 'batch' for kind, _ in self.events):
            self.first_batch_weights = _clone(pl_module.model.state_dict())
        self.events.append(('batch', trainer.global_step))
        if trainer.global_step == self.bad_step:
            self.listing_at_bad_step = _ckpt_listing(self.ckpt_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = _clone(pl_module.model.state_dict())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.events.append(('save', trainer.global_step))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.events.append(('exception', type(exception).__name__))


def _clone(state_dict) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def _stock_config(coco_root: Path, work_dir: Path, max_epochs: int = 3):
    """The tiny Mask R-CNN as a stock mmdet config (type MaskRCNN), no loggers."""
    cfg = tiny_maskrcnn_config(coco_root, max_epochs=max_epochs, work_dir=work_dir)
    cfg.lightning.loggers = []
    return cfg


@dataclasses.dataclass
class StoppedRun:
    value: str
    work_dir: Path
    error: NonFiniteLossError
    recorder: Recorder

    @property
    def ckpt_dir(self) -> Path:
        return self.work_dir / 'checkpoints'


def _stopped_run(value: str, coco_root: Path, work_dir: Path) -> StoppedRun:
    cfg = _stock_config(coco_root, work_dir)
    cfg.model.update(type='NonFiniteAtStepMaskRCNN', nonfinite_step=BAD_STEP, nonfinite_value=value)
    recorder = Recorder(work_dir / 'checkpoints', bad_step=BAD_STEP)
    with pytest.raises(NonFiniteLossError) as info:
        # One validation batch (2 images) per epoch: checkpoints still follow each validation.
        train(cfg, accelerator='cpu', callbacks=[recorder], limit_val_batches=1)
    return StoppedRun(value, work_dir, info.value, recorder)


@pytest.fixture(scope='module')
def inf_run(coco_root, tmp_path_factory) -> StoppedRun:
    return _stopped_run('inf', coco_root, tmp_path_factory.mktemp('stop_inf'))


@pytest.fixture(scope='module')
def nan_run(coco_root, tmp_path_factory) -> StoppedRun:
    return _stopped_run('nan', coco_root, tmp_path_factory.mktemp('stop_nan'))


RUNS = pytest.mark.parametrize('run_name', ['inf_run', 'nan_run'])


def _assert_all_finite(state_dict: Dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f'{where}: non-finite tensors {bad[:5]}'


@RUNS
def test_stop_names_the_bad_step_and_value(run_name, request):
    run: StoppedRun = request.getfixturevalue(run_name)
    message = str(run.error)
    assert f'training step {BAD_STEP} (epoch 2, batch 1)' in message
    assert f'loss_rpn_cls={run.value}' in message
    assert ('exception', 'NonFiniteLossError') in run.recorder.events
    # The bad step's weights update never happened: the last snapshot is after step 4's update.
    assert max(run.recorder.weights) == BAD_STEP


@RUNS
def test_nothing_is_written_from_the_bad_step_on(run_name, request):
    run: StoppedRun = request.getfixturevalue(run_name)
    events = run.recorder.events
    bad_at = events.index(('batch', BAD_STEP))
    assert all(kind != 'save' for kind, _ in events[bad_at:]), events[bad_at:]
    assert {step for kind, step in events if kind == 'save'} == {2, LAST_GOOD_STEP}
    listing = _ckpt_listing(run.ckpt_dir)
    assert set(listing) == GOOD_FILES
    # Same names, modification times and sizes as when the bad batch started.
    assert listing == run.recorder.listing_at_bad_step
    assert not [p.name for p in run.ckpt_dir.iterdir() if not p.name.endswith('.ckpt')]  # no temp files


@RUNS
@pytest.mark.parametrize('name', ['last.ckpt', NEWEST_EPOCH_FILE])
def test_last_good_checkpoint_holds_the_last_good_weights(run_name, name, request):
    run: StoppedRun = request.getfixturevalue(run_name)
    checkpoint = torch.load(run.ckpt_dir / name, map_location='cpu', weights_only=True)
    assert checkpoint['global_step'] == LAST_GOOD_STEP and checkpoint['epoch'] == 1
    for key in ('optimizer_states', 'loops', 'mm_param_schedulers', 'meta', 'hyper_parameters'):
        assert key in checkpoint, key
    state_dict = checkpoint['state_dict']
    _assert_all_finite(state_dict, name)
    expected = run.recorder.weights[LAST_GOOD_STEP]
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key
    # The in-memory weights at the stop (after step 4's update) differ: they were never saved.
    newer = run.recorder.weights[BAD_STEP]
    changed = [k for k, v in newer.items() if v.is_floating_point() and not torch.equal(state_dict[k], v)]
    assert len(changed) > 10
    momenta = [s['momentum_buffer'] for s in checkpoint['optimizer_states'][0]['state'].values()]
    assert momenta and all(torch.isfinite(m).all() for m in momenta)


def test_last_good_checkpoint_evaluates_to_finite_metrics(inf_run, coco_root, tmp_path):
    # (The NaN run's checkpoint: tools/test.py, below.)
    run = inf_run
    metrics = evaluate_checkpoint(_stock_config(coco_root, tmp_path), str(run.ckpt_dir / 'last.ckpt'),
                   work_dir=str(tmp_path), accelerator='cpu')
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


@pytest.mark.slow  # a fresh interpreter: about 15 s of imports; the API test above covers the same path
def test_tools_test_py_evaluates_the_last_good_checkpoint(nan_run, coco_root, tmp_path):
    config = tmp_path / 'tiny_maskrcnn.py'
    _stock_config(coco_root, tmp_path / 'work').dump(str(config))
    proc = run_tool('tools/test.py', config, nan_run.ckpt_dir / 'last.ckpt', '--work-dir', tmp_path / 'work',
                    '--accelerator', 'cpu')
    rows = dict(line.split() for line in proc.stdout.splitlines() if line.startswith('coco/'))
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= rows.keys()
    assert all(math.isfinite(float(v)) for v in rows.values())


def test_resume_from_the_last_good_checkpoint_api(inf_run, coco_root, tmp_path):
    # The user's fix after a divergence: the same config, resumed from last.ckpt.
    work_dir = tmp_path / 'resumed'
    shutil.copytree(inf_run.work_dir, work_dir)
    recorder = Recorder(work_dir / 'checkpoints')
    module = train(_stock_config(coco_root, work_dir), resume='auto', accelerator='cpu', callbacks=[recorder])
    assert module.trainer.global_step == 6
    # It restarted at step 4 from the saved weights, not from step 4's in-memory ones.
    assert [step for kind, step in recorder.events if kind == 'batch'] == [4, 5]
    for key, value in inf_run.recorder.weights[LAST_GOOD_STEP].items():
        assert torch.equal(recorder.first_batch_weights[key], value), key
    last = torch.load(work_dir / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert last['global_step'] == 6 and last['epoch'] == 2
    _assert_all_finite(last['state_dict'], 'resumed last.ckpt')


@pytest.mark.slow  # a fresh interpreter; test_resume_from_the_last_good_checkpoint_api runs by default
def test_resume_from_the_last_good_checkpoint_tools_train_py(nan_run, coco_root, tmp_path):
    work_dir = tmp_path / 'resumed'
    shutil.copytree(nan_run.work_dir, work_dir)
    config = tmp_path / 'tiny_maskrcnn.py'
    _stock_config(coco_root, work_dir).dump(str(config))
    run_tool('tools/train.py', config, '--work-dir', work_dir, '--resume', '--accelerator', 'cpu')
    assert set(_ckpt_listing(work_dir / 'checkpoints')) == GOOD_FILES | {'epoch=2-step=6.ckpt'}
    last = torch.load(work_dir / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert last['global_step'] == 6 and last['epoch'] == 2
    _assert_all_finite(last['state_dict'], 'resumed last.ckpt')
    # Training went on (steps 4 and 5): the weights moved away from the saved step-4 values.
    # (That it restarted from exactly those values: test_resume_from_the_last_good_checkpoint_api.)
    saved = nan_run.recorder.weights[LAST_GOOD_STEP]
    assert any(not torch.equal(last['state_dict'][k], v) for k, v in saved.items() if v.is_floating_point())


def test_enormous_learning_rate_never_lands_nonfinite_weights_in_a_checkpoint(coco_root, tmp_path):
    cfg = _stock_config(coco_root, tmp_path)
    # lr 0.01 -> 1e38 from step 3 on, the last step of epoch 1: the loss of step 3 is still
    # finite, but SGD's update grad * 1e38 overflows float32 in some weights.
    cfg.param_scheduler = [dict(type='MultiStepLR', by_epoch=False, milestones=[3], gamma=1e40)]
    with pytest.raises(FloatingPointError) as info:
        train(cfg, accelerator='cpu')
    ckpt_dir = tmp_path / 'checkpoints'
    for path in sorted(ckpt_dir.glob('*.ckpt')):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        _assert_all_finite(checkpoint['state_dict'], path.name)
    # The run stops at the step that broke the weights, before epoch 1's checkpoint.
    assert set(_ckpt_listing(ckpt_dir)) == {'epoch=0-step=2.ckpt', 'last.ckpt'}
    assert 'training step 3 (epoch 1, batch 1)' in str(info.value)
    assert 'backbone.conv1.weight' in str(info.value)
