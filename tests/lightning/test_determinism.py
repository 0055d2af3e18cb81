"""Determinism on CPU: the same seed gives the same per-step losses, whatever ``num_workers``;
random states survive a ``weights_only`` checkpoint.

Read through the CSV logger of ``acmix_mm.lightning.train`` (what ``tools/train.py`` runs), on the
tiny Mask R-CNN with shuffling and a random flip: the data order, the augmentation (per-sample
seeds, see ``acmix_mm.lightning.data``), the initialisation and mmdet's RoI/anchor sampling
(torch's global generator) must all repeat.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from acmix_mm.lightning import MMLightningModule, train
from acmix_mm.lightning.resumable import collect_rng_states, restore_rng_states
from acmix_mm.lightning.spec import RunSpec
from acmix_mm.lightning.trainer import build_trainer

from .helpers import make_coco
from .test_resume import csv_losses, resume_config

STEPS = 4
TERMS = ('train/loss', 'train/loss_rpn_cls', 'train/loss_rpn_bbox', 'train/loss_cls', 'train/loss_bbox',
         'train/loss_mask')


@pytest.fixture(scope='module')
def coco6(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp('coco6_det'), n_train=6, n_val=1)


def _losses(data_root: Path, work_dir: Path, seed: int, num_workers: int = 0):
    cfg = resume_config(data_root, max_iters=STEPS, interval=STEPS, validate=False, num_workers=num_workers)
    cfg.randomness = dict(seed=seed)
    train(cfg, work_dir=str(work_dir), accelerator='cpu', enable_checkpointing=False)
    return {term: csv_losses(work_dir, term) for term in TERMS}


def test_same_seed_same_losses_any_num_workers(coco6, tmp_path):
    first = _losses(coco6, tmp_path / 'a', seed=0)
    assert sorted(first['train/loss']) == list(range(STEPS))
    # The model trains (the numbers move), so equal runs are not equal by accident.
    assert len(set(first['train/loss'].values())) == STEPS
    assert _losses(coco6, tmp_path / 'b', seed=0) == first  # bit-identical, every term, every step
    # Data loaded in 2 worker processes: the same samples, augmented the same, the same losses.
    assert _losses(coco6, tmp_path / 'c', seed=0, num_workers=2) == first
    # Another seed is another run (another init, order, flips, RoI samples).
    other = _losses(coco6, tmp_path / 'd', seed=1)
    assert other['train/loss'] != first['train/loss']


def test_randomness_deterministic_reaches_the_trainer(coco6, tmp_path):
    cfg = resume_config(coco6, max_iters=2, validate=False)
    try:
        for value, expected in ((True, True), ('warn', True), (False, False)):
            cfg.randomness = dict(seed=0, deterministic=value)
            build_trainer(RunSpec.from_config(cfg, work_dir=str(tmp_path)), accelerator='cpu')
            assert torch.are_deterministic_algorithms_enabled() is expected
            assert torch.is_deterministic_algorithms_warn_only_enabled() is (value == 'warn')
    finally:
        torch.use_deterministic_algorithms(False)


def test_rng_states_round_trip_through_a_weights_only_checkpoint():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save({'rng_states': collect_rng_states()}, buffer)
    expected = (random.random(), np.random.randn(4), torch.rand(4))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    buffer.seek(0)
    restore_rng_states(torch.load(buffer, weights_only=True)['rng_states'])
    got = (random.random(), np.random.randn(4), torch.rand(4))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_malformed_rng_states_in_a_checkpoint_are_refused(coco6):
    module = MMLightningModule(resume_config(coco6, max_iters=2, validate=False), init_weights=False)
    module.on_load_checkpoint({'rng_states': {'torch': torch.get_rng_state(), 'numpy': {'key': 'MT19937'}}})
    with pytest.raises(ValueError, match="'rng_states' entry is not the random states"):
        module.on_train_start()
