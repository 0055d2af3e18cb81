"""A Lightning ``Trainer`` from a :class:`~acmix_mm.lightning.spec.RunSpec`.

The spec holds the config already parsed (the loop, the ``lightning`` section with the command
line applied, precision, checkpoint policy, determinism); this module only maps it onto
Lightning's arguments, for training and for testing alike.

Loop mapping: ``EpochBasedTrainLoop(max_epochs, val_interval)`` -> ``max_epochs``,
``check_val_every_n_epoch=val_interval``; ``IterBasedTrainLoop(max_iters, val_interval)`` ->
``max_steps=max_iters`` and a stop after ``max_iters`` batches (Lightning counts optimiser steps,
mmengine counts batches; they differ under accumulation, where Lightning also takes an optimiser
step at every end of a pass over the data while mmengine accumulates across it),
``val_check_interval=val_interval`` batches across epochs.
``optim_wrapper.accumulative_counts`` -> ``accumulate_grad_batches``. ``val_begin`` is ignored.
Checkpoints go to ``WORK_DIR/checkpoints`` after every validation (after every epoch, or every
``val_interval`` iterations, without validation), with ``last.ckpt`` kept up to date, each
written atomically (:class:`~acmix_mm.lightning.checkpoint_io.AtomicCheckpointIO`: complete or
absent, never truncated, also under ``kill -9``).

Determinism: ``randomness.deterministic=True`` -> ``Trainer(deterministic=True)`` (torch's
deterministic algorithms, cuDNN autotuning off; ``'warn'``: warn where torch has none instead of
raising); otherwise ``env_cfg.cudnn_benchmark`` -> ``Trainer(benchmark=...)`` as mmengine's
Runner sets it.
"""
from __future__ import annotations

from typing import Any, Dict, List

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from .checkpoint_io import AtomicCheckpointIO
from .progress import IterationProgressBar
from .spec import RunSpec

__all__ = ['build_trainer']


def _checkpoint_callback(spec: RunSpec) -> ModelCheckpoint:
    policy = spec.checkpoint
    kwargs: Dict[str, Any] = dict(dirpath=spec.checkpoint_dir, filename='epoch={epoch}-step={step}',
                                  auto_insert_metric_name=False, save_last=policy.save_last,
                                  save_top_k=policy.save_top_k, monitor=policy.monitor, mode=policy.mode,
                                  # Overwrite rather than write last-v1.ckpt (e.g. in a copied work
                                  # dir), so that `--resume` always finds the newest in last.ckpt.
                                  enable_version_counter=False)
    if not spec.validates and spec.loop is not None:
        if spec.loop.by_epoch:
            kwargs.update(every_n_epochs=1, save_on_train_epoch_end=True)
        else:
            kwargs.update(every_n_train_steps=spec.loop.val_interval)
    return ModelCheckpoint(**kwargs)


def _loggers(spec: RunSpec) -> List[Any]:
    makers = {'tensorboard': lambda: TensorBoardLogger(save_dir=spec.work_dir, name='tensorboard'),
              'csv': lambda: CSVLogger(save_dir=spec.work_dir, name='csv')}
    return [makers[name]() for name in spec.lightning.loggers]


def _strategy(spec: RunSpec) -> Any:
    strategy = spec.lightning.strategy
    if strategy == 'ddp' and spec.find_unused_parameters:
        return DDPStrategy(find_unused_parameters=True)
    return strategy


def build_trainer(spec: RunSpec, **extra: Any) -> Trainer:
    """Build the Trainer of ``spec`` (training: the loop, checkpoints, loggers; testing: devices,
    precision and the section's ``trainer_kwargs``).

    Args:
        spec: the parsed run (:meth:`RunSpec.from_config`).
        **extra: further ``Trainer`` arguments; they win over everything. ``callbacks`` are
            added to the checkpoint callback, which ``enable_checkpointing=False`` removes; a
            ``CheckpointIO`` among ``plugins`` replaces acmix_mm's atomic writer.
    """
    section = spec.lightning
    kwargs: Dict[str, Any] = dict(
        accelerator=section.accelerator,
        devices=section.devices,
        num_nodes=section.num_nodes,
        strategy=_strategy(spec),
        precision=spec.precision,
        accumulate_grad_batches=spec.optim.accumulate_grad_batches,
        default_root_dir=spec.work_dir,
        callbacks=[_checkpoint_callback(spec)],
        logger=_loggers(spec),
        # Evaluation samplers shard without padding themselves (data.py); training uses the
        # config's sampler, which is already distributed-aware (mmengine's DefaultSampler).
        use_distributed_sampler=False,
        num_sanity_val_steps=section.num_sanity_val_steps,
        log_every_n_steps=spec.log_every_n_steps,
        enable_progress_bar=section.enable_progress_bar,
        deterministic=spec.deterministic,
        plugins=[AtomicCheckpointIO()],
    )
    if spec.benchmark is not None:
        kwargs['benchmark'] = spec.benchmark
    loop = spec.loop
    if loop is not None and loop.by_epoch:
        kwargs.update(max_epochs=loop.max_epochs, check_val_every_n_epoch=loop.val_interval)
    elif loop is not None:
        # max_steps is an upper bound: with accumulation MMLightningModule stops on the batch count.
        kwargs.update(max_epochs=-1, max_steps=loop.max_iters,
                      val_check_interval=loop.val_interval, check_val_every_n_epoch=None)
    if spec.stage == 'fit' and not spec.validates:
        kwargs['limit_val_batches'] = 0
    for source in (dict(section.trainer_kwargs), dict(extra)):
        callbacks = list(source.pop('callbacks', None) or [])
        plugins = source.pop('plugins', None)
        kwargs.update(source)
        kwargs['callbacks'] = kwargs['callbacks'] + callbacks
        if plugins is not None:
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs['plugins'] = plugins  # the caller's own checkpoint writer replaces ours
            else:
                kwargs['plugins'] = [p for p in kwargs['plugins'] if isinstance(p, CheckpointIO)] + plugins
    if kwargs.get('enable_checkpointing') is False:
        kwargs['callbacks'] = [c for c in kwargs['callbacks'] if not isinstance(c, ModelCheckpoint)]
    if (loop is not None and not loop.by_epoch and kwargs.get('enable_progress_bar') is not False
            and _RICH_AVAILABLE and not any(isinstance(c, ProgressBar) for c in kwargs['callbacks'])):
        kwargs['callbacks'].append(IterationProgressBar())  # 'Step 120/1000', not 'Epoch 1/-2'
    return Trainer(**kwargs)
