"""Training through Lightning gives the losses mmengine's Runner gives (same seed, config, data order)."""
import copy

import pytest
from lightning.pytorch import Callback
from mmengine.hooks import Hook
from mmengine.runner import Runner

from acmix_mm.lightning import train

from .helpers import make_coco, tiny_maskrcnn_config


class _RunnerLosses(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append({k: float(v.detach()) for k, v in outputs.items()})


class _LightningLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append({k[len('train/'):]: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith('train/') and k not in ('train/lr', 'train/grad_norm')})


def test_losses_equal_mmengine_runner(tmp_path):
    # One epoch of 3 iterations. (mmengine's IterBasedTrainLoop creates its dataloader iterator,
    # which draws one torch random number, before init_weights(); an iteration-based run thus
    # starts from another random init than Lightning's for the same seed, so this compares an
    # EpochBasedTrainLoop, where both draw in the same order.)
    root = make_coco(tmp_path / 'data', n_train=6, n_val=1)
    cfg = tiny_maskrcnn_config(root, max_epochs=1, work_dir=tmp_path / 'runner')
    # Gradient clipping and a warm-up are part of what must match.
    cfg.optim_wrapper.clip_grad = dict(max_norm=10.0, norm_type=2)
    for key in ('val_dataloader', 'val_evaluator', 'val_cfg', 'test_dataloader', 'test_evaluator', 'test_cfg'):
        cfg.pop(key)
    cfg.randomness = dict(seed=7)

    runner_cfg = copy.deepcopy(cfg)
    runner_cfg.pop('lightning')
    runner_cfg.default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1000))
    runner = Runner.from_cfg(runner_cfg)
    runner_probe = _RunnerLosses()
    runner.register_hook(runner_probe)
    runner.train()

    probe = _LightningLosses()
    train(copy.deepcopy(cfg), work_dir=str(tmp_path / 'pl'), callbacks=[probe], accelerator='cpu',
          enable_checkpointing=False, logger=False)

    assert len(runner_probe.losses) == len(probe.losses) == 3
    assert set(runner_probe.losses[0]) == set(probe.losses[0]) >= {'loss', 'loss_rpn_cls', 'loss_mask'}
    for step, (expected, got) in enumerate(zip(runner_probe.losses, probe.losses)):
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, name)
    # The model trained: the losses moved.
    assert runner_probe.losses[0]['loss'] != runner_probe.losses[-1]['loss']
