"""The learning rate at every iteration equals what mmengine's Runner gives for the same config."""
import copy

import pytest
import torch
from lightning.pytorch import Callback
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from mmengine.runner import Runner
from torch.utils.data import Dataset

from acmix_mm.lightning import MMDataModule, MMLightningModule, RunSpec, build_trainer


@MODELS.register_module(name='_LrProbeModel', force=True)
class LrProbeModel(BaseModel):
    """A linear regression: enough to take optimiser steps."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        out = self.linear(x)
        if mode == 'loss':
            return dict(loss=(out ** 2).mean())
        return out


@DATASETS.register_module(name='_LrProbeData', force=True)
class LrProbeData(Dataset):
    def __init__(self, n=6):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([float(i), 1.0]))


def _config(train_cfg, schedulers, tmp_path, accumulate=1):
    return Config(dict(
        model=dict(type='_LrProbeModel'),
        work_dir=str(tmp_path / 'runner'),
        train_dataloader=dict(batch_size=2, num_workers=0, dataset=dict(type='_LrProbeData', n=6),
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        train_cfg=train_cfg,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9), accumulative_counts=accumulate),
        param_scheduler=schedulers,
        lightning=dict(enable_progress_bar=False, loggers=[]),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1000)),
    ))


class _RunnerLr(Hook):
    def __init__(self):
        self.lrs = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lrs.append(runner.optim_wrapper.optimizer.param_groups[0]['lr'])


class _LightningLr(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]['lr'])


def _runner_lrs(cfg):
    runner_cfg = copy.deepcopy(cfg)
    runner_cfg.pop('lightning')
    runner = Runner.from_cfg(runner_cfg)
    probe = _RunnerLr()
    runner.register_hook(probe)
    runner.train()
    return probe.lrs


def _lightning_lrs(cfg, tmp_path):
    module = MMLightningModule(cfg)
    probe = _LightningLr()
    trainer = build_trainer(RunSpec.from_config(cfg, work_dir=str(tmp_path / 'pl')), callbacks=[probe],
                            enable_checkpointing=False,
                            accelerator='cpu')
    trainer.fit(module, datamodule=MMDataModule(cfg))
    return probe.lrs


WARMUP = dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)
CASES = {
    'iter: warm-up + multistep': (
        dict(type='IterBasedTrainLoop', max_iters=12, val_interval=100),
        [WARMUP, dict(type='MultiStepLR', by_epoch=False, milestones=[6, 9], gamma=0.1)]),
    'epoch: warm-up by iter + multistep by epoch': (
        dict(type='EpochBasedTrainLoop', max_epochs=4),
        [WARMUP, dict(type='MultiStepLR', by_epoch=True, milestones=[2, 3], gamma=0.1)]),
    'epoch: warm-up by epoch + cosine converted to iterations': (
        dict(type='EpochBasedTrainLoop', max_epochs=4),
        [dict(type='LinearLR', start_factor=0.5, by_epoch=True, begin=0, end=1),
         dict(type='CosineAnnealingLR', by_epoch=True, begin=1, T_max=3, convert_to_iter_based=True)]),
    'iter: poly': (
        dict(type='IterBasedTrainLoop', max_iters=9, val_interval=100),
        [dict(type='PolyLR', by_epoch=False, power=0.9, eta_min=1e-4)]),
}


@pytest.mark.parametrize('name', list(CASES))
def test_lr_sequence_equals_mmengine_runner(name, tmp_path):
    train_cfg, schedulers = CASES[name]
    cfg = _config(train_cfg, schedulers, tmp_path)
    expected = _runner_lrs(cfg)
    got = _lightning_lrs(_config(train_cfg, schedulers, tmp_path), tmp_path)
    n_iters = train_cfg.get('max_iters') or train_cfg['max_epochs'] * 3  # 6 samples, batch 2
    assert len(expected) == len(got) == n_iters
    assert len(set(round(v, 12) for v in expected)) > 2  # the schedule really moves
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_lr_sequence_with_gradient_accumulation(tmp_path):
    # mmengine steps iteration-based schedules every iteration (batch), not every optimiser step.
    train_cfg, schedulers = CASES['iter: warm-up + multistep']
    expected = _runner_lrs(_config(train_cfg, schedulers, tmp_path, accumulate=2))
    cfg = _config(train_cfg, schedulers, tmp_path, accumulate=2)
    module = MMLightningModule(cfg)
    probe = _LightningLr()
    trainer = build_trainer(RunSpec.from_config(cfg, work_dir=str(tmp_path / 'pl')), callbacks=[probe],
                            enable_checkpointing=False,
                            accelerator='cpu')
    assert trainer.accumulate_grad_batches == 2
    trainer.fit(module, datamodule=MMDataModule(cfg))
    assert len(expected) == len(probe.lrs) == 12
    assert probe.lrs == pytest.approx(expected, rel=1e-12, abs=0)
