"""A Lightning ``Trainer`` from an mmengine config's ``train_cfg``, ``lightning`` section and CLI.

Precedence, highest first: explicit arguments (the command line), the config's optional
``lightning=dict(...)`` section, what the rest of the config implies (``train_cfg``,
``optim_wrapper``, ``default_hooks``, ``randomness``), Lightning's defaults.

The ``lightning`` section (every key optional)::

    lightning = dict(
        accelerator='auto', devices=1, num_nodes=1, strategy='auto',   # Trainer's own meaning
        precision=None,             # None: from optim_wrapper (AmpOptimWrapper -> '16-mixed' /
                                    # 'bf16-mixed'; '16-mixed' becomes 'bf16-mixed' on CPU), else '32-true'
        find_unused_parameters=False,   # DDP; also read from model_wrapper_cfg / find_unused_parameters
        nan_policy='raise',         # or 'skip' (MMLightningModule)
        per_sample_seed=True,       # augmentation = f(seed, epoch, sample index) (MMDataModule)
        sync_bn='auto',             # 'auto' | 'keep' | 'revert' (MMLightningModule)
        log_every_n_steps=None,     # None: default_hooks.logger.interval, else 50
        num_sanity_val_steps=0,     # mmengine's Runner runs no sanity check
        enable_progress_bar=True,
        checkpoint=dict(save_last=True, save_top_k=None, monitor=None, mode=None),
                                    # None: from default_hooks.checkpoint (max_keep_ckpts, save_best, rule)
        loggers=('tensorboard', 'csv'),
        trainer_kwargs=dict(),      # passed to lightning.pytorch.Trainer as they are
    )

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
raising); otherwise ``env_cfg.cudnn_benchmark`` ->
``Trainer(benchmark=...)`` as mmengine's Runner sets it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from mmengine.config import Config

from .checkpoint_io import AtomicCheckpointIO
from .config import LoopSpec, check_lightning_section
from .optim import OptimSettings

LIGHTNING_KEYS = ('accelerator', 'devices', 'num_nodes', 'strategy', 'precision', 'find_unused_parameters',
                  'nan_policy', 'per_sample_seed', 'sync_bn', 'log_every_n_steps', 'num_sanity_val_steps',
                  'enable_progress_bar', 'checkpoint', 'loggers', 'trainer_kwargs')
CHECKPOINT_KEYS = ('save_last', 'save_top_k', 'monitor', 'mode')
LOGGERS = ('tensorboard', 'csv')
PRECISIONS = ('32', '32-true', '16-mixed', 'bf16-mixed', '64', '64-true', 'bf16-true', '16-true')
CHECKPOINT_DIR = 'checkpoints'


@dataclasses.dataclass
class TrainerOverrides:
    """Command-line values that override the config (None: not given)."""

    accelerator: Optional[str] = None
    devices: Optional[Any] = None
    num_nodes: Optional[int] = None
    strategy: Optional[str] = None
    precision: Optional[str] = None
    max_epochs: Optional[int] = None
    max_steps: Optional[int] = None


def lightning_section(cfg: Config) -> Dict[str, Any]:
    """The config's ``lightning`` section as a dict, with its keys and values checked."""
    return check_lightning_section(cfg.get('lightning'))


def resolve_precision(cfg: Config, section: Mapping[str, Any], override: Optional[str],
                      accelerator: str) -> str:
    """The Lightning precision: CLI, else ``lightning.precision``, else from ``optim_wrapper``."""
    precision = override or section.get('precision')
    if precision is None:
        optim_cfg = cfg.get('optim_wrapper')
        precision = (OptimSettings.from_config(optim_cfg).precision if optim_cfg else None) or '32-true'
        if precision == '16-mixed' and _runs_on_cpu(accelerator):
            warnings.warn("AmpOptimWrapper asks for float16 mixed precision, which Lightning does not "
                          "support on CPU; using 'bf16-mixed'")
            precision = 'bf16-mixed'
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f'precision={precision!r} is not supported; allowed: {", ".join(PRECISIONS)}')
    return precision


def _runs_on_cpu(accelerator: str) -> bool:
    if accelerator == 'cpu':
        return True
    return accelerator == 'auto' and not torch.cuda.is_available()


def _checkpoint_callback(cfg: Config, section: Mapping[str, Any], loop: LoopSpec, work_dir: str,
                         validates: bool) -> ModelCheckpoint:
    options = dict(section.get('checkpoint') or {})
    unknown = sorted(set(options) - set(CHECKPOINT_KEYS))
    if unknown:
        raise ValueError(f'unknown key(s) in lightning.checkpoint: {", ".join(unknown)}; '
                         f'allowed: {", ".join(CHECKPOINT_KEYS)}')
    hook = dict((cfg.get('default_hooks') or {}).get('checkpoint') or {})
    monitor = options.get('monitor')
    mode = options.get('mode')
    save_top_k = options.get('save_top_k')
    save_best = hook.get('save_best')
    if monitor is None and isinstance(save_best, str) and save_best != 'auto' and validates:
        monitor = save_best
        mode = mode or {'greater': 'max', 'less': 'min'}.get(hook.get('rule') or 'greater', 'max')
    if save_top_k is None:
        max_keep = hook.get('max_keep_ckpts', -1)
        save_top_k = -1 if max_keep is None or max_keep < 0 else int(max_keep)
    if monitor is None and save_top_k not in (-1, 0, 1):
        monitor, mode = 'step', 'max'  # keep the newest k, as mmengine's max_keep_ckpts does
    kwargs: Dict[str, Any] = dict(dirpath=os.path.join(work_dir, CHECKPOINT_DIR), filename='epoch={epoch}-step={step}',
                                  auto_insert_metric_name=False, save_last=options.get('save_last', True),
                                  save_top_k=save_top_k, monitor=monitor, mode=mode or 'max',
                                  # Overwrite rather than write last-v1.ckpt (e.g. in a copied work
                                  # dir), so that `--resume` always finds the newest in last.ckpt.
                                  enable_version_counter=False)
    if not validates:
        if loop.by_epoch:
            kwargs.update(every_n_epochs=1, save_on_train_epoch_end=True)
        else:
            kwargs.update(every_n_train_steps=loop.val_interval)
    return ModelCheckpoint(**kwargs)


def _loggers(section: Mapping[str, Any], work_dir: str) -> List[Any]:
    names = section.get('loggers', LOGGERS)
    names = [names] if isinstance(names, str) else list(names)
    loggers = []
    for name in names:
        if name == 'tensorboard':
            loggers.append(TensorBoardLogger(save_dir=work_dir, name='tensorboard'))
        elif name == 'csv':
            loggers.append(CSVLogger(save_dir=work_dir, name='csv'))
        else:
            raise ValueError(f'lightning.loggers has {name!r}; allowed: {", ".join(LOGGERS)}')
    return loggers


def _strategy(cfg: Config, section: Mapping[str, Any], strategy: Any) -> Any:
    find_unused = bool(section.get('find_unused_parameters', cfg.get('find_unused_parameters', False))
                       or (cfg.get('model_wrapper_cfg') or {}).get('find_unused_parameters', False))
    if strategy == 'ddp' and find_unused:
        return DDPStrategy(find_unused_parameters=True)
    return strategy


def build_trainer(cfg: Config, work_dir: str, overrides: Optional[TrainerOverrides] = None,
                  validates: Optional[bool] = None, **extra: Any) -> Trainer:
    """Build the Trainer for ``cfg`` (``cfg.train_cfg`` must already hold the final loop).

    Args:
        cfg: the config (``train_cfg``, optional ``lightning``, ``optim_wrapper``, ``default_hooks``).
        work_dir: where checkpoints and logs go.
        overrides: command-line values.
        validates: whether training validates (default: the config has ``val_dataloader``).
        **extra: further ``Trainer`` arguments (win over everything; ``callbacks`` are added to
            the checkpoint callback, which ``enable_checkpointing=False`` removes).
    """
    overrides = overrides or TrainerOverrides()
    section = lightning_section(cfg)
    loop = LoopSpec.from_config(cfg)
    validates = bool(cfg.get('val_dataloader')) if validates is None else validates
    accelerator = overrides.accelerator or section.get('accelerator', 'auto')
    optim = OptimSettings.from_config(cfg.optim_wrapper) if cfg.get('optim_wrapper') else OptimSettings()
    strategy = _strategy(cfg, section, overrides.strategy or section.get('strategy', 'auto'))
    logger_hook = (cfg.get('default_hooks') or {}).get('logger') or {}
    deterministic = (cfg.get('randomness') or {}).get('deterministic', False)
    # 'warn' (Lightning's): torch's deterministic algorithms, warning instead of raising for ops
    # that have none (e.g. bilinear interpolate backward on CUDA, which mmseg's heads use).
    deterministic = 'warn' if deterministic == 'warn' else bool(deterministic)
    kwargs: Dict[str, Any] = dict(
        accelerator=accelerator,
        devices=overrides.devices if overrides.devices is not None else section.get('devices', 1),
        num_nodes=overrides.num_nodes or section.get('num_nodes', 1),
        strategy=strategy,
        precision=resolve_precision(cfg, section, overrides.precision, accelerator),
        accumulate_grad_batches=optim.accumulate_grad_batches,
        default_root_dir=work_dir,
        callbacks=[_checkpoint_callback(cfg, section, loop, work_dir, validates)],
        logger=_loggers(section, work_dir),
        # Evaluation samplers shard without padding themselves (data.py); training uses the
        # config's sampler, which is already distributed-aware (mmengine's DefaultSampler).
        use_distributed_sampler=False,
        num_sanity_val_steps=section.get('num_sanity_val_steps', 0),
        log_every_n_steps=section.get('log_every_n_steps') or logger_hook.get('interval', 50),
        enable_progress_bar=section.get('enable_progress_bar', True),
        deterministic=deterministic,
        plugins=[AtomicCheckpointIO()],
    )
    benchmark = (cfg.get('env_cfg') or {}).get('cudnn_benchmark')
    if benchmark is not None and not deterministic:
        kwargs['benchmark'] = bool(benchmark)
    if loop.by_epoch:
        kwargs.update(max_epochs=loop.max_epochs, check_val_every_n_epoch=loop.val_interval)
    else:
        # max_steps is an upper bound: with accumulation MMLightningModule stops on the batch count.
        kwargs.update(max_epochs=-1, max_steps=loop.max_iters,
                      val_check_interval=loop.val_interval, check_val_every_n_epoch=None)
    if not validates:
        kwargs['limit_val_batches'] = 0
    for source in (dict(section.get('trainer_kwargs') or {}), dict(extra)):
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
    return Trainer(**kwargs)
