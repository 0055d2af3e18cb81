"""RunSpec: a config parsed and checked once, for the whole run.

``train()`` and ``test()`` turn the mmengine config into one frozen :class:`RunSpec` before
anything is built: the training loop (:class:`LoopSpec`, from ``train_cfg`` and
``--max-epochs``/``--max-steps``), what ``optim_wrapper`` asks of the loop
(:class:`OptimSettings`), the checked ``lightning`` section
(:class:`~acmix_mm.lightning.section.LightningSection`, with the command line's
:class:`TrainerOverrides` applied), the work dir, the seed, the precision, and what the Trainer
takes from ``default_hooks``, ``randomness`` and ``env_cfg``. :class:`MMDataModule`,
:class:`MMLightningModule` and :func:`build_trainer` receive it and never parse those keys again.

Precedence, highest first: the command line, the ``lightning`` section, what the rest of the
config implies (``train_cfg``, ``optim_wrapper``, ``default_hooks``, ``randomness``),
Lightning's defaults.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from mmengine.config import Config, ConfigDict

from .section import PRECISIONS, LightningSection

__all__ = ['RunSpec', 'LoopSpec', 'OptimSettings', 'TrainerOverrides', 'CheckpointPolicy', 'CHECKPOINT_DIR',
           'apply_loop_spec', 'resolve_work_dir']

CHECKPOINT_DIR = 'checkpoints'


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What ``train_cfg`` asks of the training loop.

    Attributes:
        by_epoch: True for ``EpochBasedTrainLoop``, False for ``IterBasedTrainLoop``.
        max_epochs: epochs to train (``None`` for iteration-based loops).
        max_iters: iterations (batches) to train (``None`` for epoch-based loops).
        val_interval: validate every ``val_interval`` epochs (by_epoch) or iterations.
        val_begin: first epoch/iteration at which validation may run (mmengine's ``val_begin``).
    """

    by_epoch: bool
    max_epochs: Optional[int]
    max_iters: Optional[int]
    val_interval: int
    val_begin: int = 1

    _EPOCH_TYPES = ('EpochBasedTrainLoop', 'mmengine.EpochBasedTrainLoop')
    _ITER_TYPES = ('IterBasedTrainLoop', 'mmengine.IterBasedTrainLoop')

    @classmethod
    def from_config(cls, cfg: Config) -> 'LoopSpec':
        train_cfg = cfg.get('train_cfg')
        if not train_cfg:
            raise ValueError('the config has no train_cfg; training needs e.g. '
                             "train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)")
        if not isinstance(train_cfg, Mapping):
            raise TypeError(f'train_cfg must be a dict, got a {type(train_cfg).__name__}: {train_cfg!r:.200}; e.g. '
                            "train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)")
        loop_type = train_cfg.get('type')
        by_epoch = train_cfg.get('by_epoch')
        if loop_type in cls._EPOCH_TYPES or (loop_type is None and by_epoch is not False):
            by_epoch = True
        elif loop_type in cls._ITER_TYPES or (loop_type is None and by_epoch is False):
            by_epoch = False
        else:
            raise ValueError(f'train_cfg.type={loop_type!r} is not supported; allowed: '
                             'EpochBasedTrainLoop, IterBasedTrainLoop')
        val_interval = _positive_int(train_cfg, 'val_interval', default=1)
        val_begin = train_cfg.get('val_begin', 1)
        if isinstance(val_begin, bool) or not isinstance(val_begin, int):
            raise ValueError(f'train_cfg.val_begin must be an int, got {val_begin!r}')
        if by_epoch:
            max_epochs = _positive_int(train_cfg, 'max_epochs')
            return cls(True, max_epochs, None, val_interval, val_begin)
        max_iters = _positive_int(train_cfg, 'max_iters')
        return cls(False, None, max_iters, val_interval, val_begin)

    def with_limits(self, max_epochs: Optional[int] = None, max_steps: Optional[int] = None) -> 'LoopSpec':
        """The same loop with the command line's ``--max-epochs`` or ``--max-steps`` applied.

        ``--max-steps`` turns the loop iteration-based (mmengine's ``IterBasedTrainLoop``);
        ``--max-epochs`` turns it epoch-based.
        """
        if max_epochs is not None and max_steps is not None:
            raise ValueError('give --max-epochs or --max-steps, not both')
        if max_epochs is not None:
            if max_epochs < 1:
                raise ValueError(f'max_epochs must be >= 1, got {max_epochs}')
            return dataclasses.replace(self, by_epoch=True, max_epochs=max_epochs, max_iters=None)
        if max_steps is not None:
            if max_steps < 1:
                raise ValueError(f'max_steps must be >= 1, got {max_steps}')
            return dataclasses.replace(self, by_epoch=False, max_epochs=None, max_iters=max_steps)
        return self


def _positive_int(section: Mapping[str, Any], key: str, default: Optional[int] = None) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'train_cfg.{key} must be a positive int, got {value!r}')
    return value


def apply_loop_spec(cfg: Config, spec: LoopSpec) -> None:
    """Write ``spec`` back into ``cfg.train_cfg`` so that every reader of the config agrees."""
    train_cfg = dict(cfg.get('train_cfg') or {})
    train_cfg.pop('by_epoch', None)
    if spec.by_epoch:
        train_cfg.update(type='EpochBasedTrainLoop', max_epochs=spec.max_epochs)
        train_cfg.pop('max_iters', None)
    else:
        train_cfg.update(type='IterBasedTrainLoop', max_iters=spec.max_iters)
        train_cfg.pop('max_epochs', None)
    train_cfg['val_interval'] = spec.val_interval
    cfg.train_cfg = ConfigDict(train_cfg)


_AMP_TYPES = ('AmpOptimWrapper', 'mmengine.AmpOptimWrapper')
_PLAIN_TYPES = ('OptimWrapper', 'mmengine.OptimWrapper', None)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """What ``optim_wrapper`` asks of the loop beyond the optimiser itself.

    Attributes:
        clip_grad: mmengine's ``clip_grad`` dict (``max_norm``/``norm_type`` for norm clipping, or
            ``type='value'`` with ``clip_value``), or None.
        precision: the Lightning precision the wrapper implies (``'16-mixed'``, ``'bf16-mixed'``)
            or None for full precision.
        accumulate_grad_batches: ``accumulative_counts`` (1 when absent).
    """

    clip_grad: Optional[dict] = None
    precision: Optional[str] = None
    accumulate_grad_batches: int = 1

    @classmethod
    def from_config(cls, optim_cfg: Mapping[str, Any]) -> 'OptimSettings':
        wrapper_type = optim_cfg.get('type', 'OptimWrapper')
        if wrapper_type not in _AMP_TYPES + _PLAIN_TYPES:
            raise ValueError(f'optim_wrapper.type={wrapper_type!r} is not supported; allowed: '
                             'OptimWrapper, AmpOptimWrapper')
        precision = None
        if wrapper_type in _AMP_TYPES:
            dtype = optim_cfg.get('dtype')
            if dtype in (None, 'float16', 'fp16', torch.float16):
                precision = '16-mixed'
            elif dtype in ('bfloat16', 'bf16', torch.bfloat16):
                precision = 'bf16-mixed'
            else:
                raise ValueError(f'optim_wrapper.dtype={dtype!r} is not supported; '
                                 "allowed: 'float16', 'bfloat16'")
        check_optimizer_numbers(optim_cfg.get('optimizer'))
        accumulate = optim_cfg.get('accumulative_counts', 1)
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f'optim_wrapper.accumulative_counts must be a positive int, got {accumulate!r}')
        clip_grad = optim_cfg.get('clip_grad')
        if clip_grad is not None:
            clip_grad = dict(clip_grad)
            clip_type = clip_grad.get('type', 'norm')
            if clip_type == 'norm' and 'max_norm' not in clip_grad:
                raise ValueError(f'optim_wrapper.clip_grad={clip_grad} needs max_norm')
            if clip_type == 'value' and 'clip_value' not in clip_grad:
                raise ValueError(f'optim_wrapper.clip_grad={clip_grad} needs clip_value')
            if clip_type not in ('norm', 'value'):
                raise ValueError(f"optim_wrapper.clip_grad.type={clip_type!r}; allowed: 'norm', 'value'")
        return cls(clip_grad, precision, accumulate)


#: Optimiser arguments that must be real numbers >= 0 when a config sets them.
OPTIMIZER_NUMBERS = ('lr', 'weight_decay', 'momentum', 'eps', 'alpha', 'dampening')


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer_numbers(optimizer_cfg: Optional[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming ``optim_wrapper.optimizer.<key>`` when a hyperparameter is not a
    finite real number >= 0 (:data:`OPTIMIZER_NUMBERS`), or ``betas`` is not two numbers in [0, 1).

    torch would only reject such a value inside ``trainer.fit``, without naming the key.
    """
    if not isinstance(optimizer_cfg, Mapping):
        return
    for key in OPTIMIZER_NUMBERS:
        if key in optimizer_cfg:
            value = optimizer_cfg[key]
            if not _is_real(value) or value < 0:
                raise ValueError(f'optim_wrapper.optimizer.{key}={value!r} must be a finite number >= 0')
    if 'betas' in optimizer_cfg:
        betas = optimizer_cfg['betas']
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(_is_real(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f'optim_wrapper.optimizer.betas={betas!r} must be two numbers in [0, 1)')


@dataclasses.dataclass(frozen=True)
class TrainerOverrides:
    """Command-line values that override the config (None: not given)."""

    accelerator: Optional[str] = None
    devices: Optional[Any] = None
    num_nodes: Optional[int] = None
    strategy: Optional[str] = None
    precision: Optional[str] = None
    max_epochs: Optional[int] = None
    max_steps: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """Which checkpoints a run keeps: the ``lightning.checkpoint`` keys, resolved.

    Unset keys come from mmengine's ``default_hooks.checkpoint``: ``max_keep_ckpts`` ->
    ``save_top_k`` (the newest k, ranked by step), ``save_best``/``rule`` -> ``monitor``/``mode``
    (only when the run validates).
    """

    save_last: Union[bool, str] = True
    save_top_k: int = -1
    monitor: Optional[str] = None
    mode: str = 'max'

    @classmethod
    def resolve(cls, options: Mapping[str, Any], hook: Mapping[str, Any], validates: bool) -> 'CheckpointPolicy':
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
        return cls(options.get('save_last', True), save_top_k, monitor, mode or 'max')


def resolve_work_dir(cfg: Config, work_dir: Optional[str]) -> str:
    """``--work-dir``, else ``cfg.work_dir``, else ``./work_dirs/<config file stem>``."""
    if work_dir:
        return str(work_dir)
    if cfg.get('work_dir'):
        return str(cfg.work_dir)
    stem = Path(cfg.filename).stem if getattr(cfg, 'filename', None) else 'default'
    return os.path.join('work_dirs', stem)


def _runs_on_cpu(accelerator: Any) -> bool:
    if accelerator == 'cpu':
        return True
    return accelerator == 'auto' and not torch.cuda.is_available()


def _precision(section: LightningSection, optim: OptimSettings, override: Optional[str]) -> str:
    """The Lightning precision: CLI, else ``lightning.precision``, else from ``optim_wrapper``."""
    precision = override or section.precision
    if precision is None:
        precision = optim.precision or '32-true'
        if precision == '16-mixed' and _runs_on_cpu(section.accelerator):
            warnings.warn("AmpOptimWrapper asks for float16 mixed precision, which Lightning does not "
                          "support on CPU; using 'bf16-mixed'")
            precision = 'bf16-mixed'
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f'precision={precision!r} is not supported; allowed: {", ".join(PRECISIONS)}')
    return precision


STAGES = ('fit', 'test')


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run needs from its config besides the model, data and metric definitions.

    Attributes:
        stage: ``'fit'`` (training) or ``'test'``.
        loop: the training loop (None when testing).
        optim: what ``optim_wrapper`` asks of the loop (clipping, precision, accumulation).
        lightning: the checked ``lightning`` section, command-line overrides applied.
        work_dir: where checkpoints (``WORK_DIR/checkpoints``), logs and the config copy go.
        seed: the run's seed (``--seed``, else ``randomness.seed``), or None.
        precision: the Lightning precision.
        validates: whether training validates (the config has a ``val_dataloader``).
        checkpoint: which checkpoints training keeps.
        log_every_n_steps: ``lightning.log_every_n_steps``, else ``default_hooks.logger.interval``, else 50.
        deterministic: ``randomness.deterministic`` (True, False or ``'warn'``).
        benchmark: ``env_cfg.cudnn_benchmark`` (None: unset, or overruled by ``deterministic``).
        find_unused_parameters: DDP's flag (the section, ``find_unused_parameters`` or
            ``model_wrapper_cfg.find_unused_parameters``).
        diff_rank_seed: ``randomness.diff_rank_seed``.
    """

    stage: str
    loop: Optional[LoopSpec]
    optim: OptimSettings
    lightning: LightningSection
    work_dir: str
    seed: Optional[int]
    precision: str
    validates: bool = False
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    log_every_n_steps: int = 50
    deterministic: Union[bool, str] = False
    benchmark: Optional[bool] = None
    find_unused_parameters: bool = False
    diff_rank_seed: bool = False

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.work_dir, CHECKPOINT_DIR)

    @classmethod
    def from_config(cls, cfg: Config, stage: str = 'fit', work_dir: Optional[str] = None,
                    seed: Optional[int] = None, overrides: Optional[TrainerOverrides] = None) -> 'RunSpec':
        """Parse and check ``cfg`` for ``stage``; nothing is built or written.

        Args:
            cfg: the mmengine config (``train_cfg`` is needed for ``'fit'``).
            stage: ``'fit'`` or ``'test'``.
            work_dir: ``--work-dir`` (see :func:`resolve_work_dir`).
            seed: ``--seed``; None: ``randomness.seed``.
            overrides: the command line's Trainer values.

        Raises:
            TypeError, ValueError: a bad key or value, named in the message.
        """
        if stage not in STAGES:
            raise ValueError(f'stage={stage!r}; allowed: {", ".join(STAGES)}')
        overrides = overrides or TrainerOverrides()
        section = LightningSection.from_config(cfg.get('lightning'))
        changes = {k: getattr(overrides, k) for k in ('accelerator', 'strategy', 'num_nodes')
                   if getattr(overrides, k)}
        if overrides.devices is not None:
            changes['devices'] = overrides.devices
        section = dataclasses.replace(section, **changes)
        loop = None
        if stage == 'fit':
            loop = LoopSpec.from_config(cfg).with_limits(overrides.max_epochs, overrides.max_steps)
        optim_cfg = cfg.get('optim_wrapper')
        optim = OptimSettings.from_config(optim_cfg) if optim_cfg else OptimSettings()
        randomness = cfg.get('randomness') or {}
        if seed is None:
            seed = randomness.get('seed')
        validates = stage == 'fit' and bool(cfg.get('val_dataloader'))
        hooks = cfg.get('default_hooks') or {}
        # 'warn' (Lightning's): torch's deterministic algorithms, warning instead of raising for ops
        # that have none (e.g. bilinear interpolate backward on CUDA, which mmseg's heads use).
        deterministic = randomness.get('deterministic', False)
        deterministic = 'warn' if deterministic == 'warn' else bool(deterministic)
        benchmark = (cfg.get('env_cfg') or {}).get('cudnn_benchmark')
        benchmark = None if benchmark is None or deterministic else bool(benchmark)
        find_unused = section.find_unused_parameters
        if find_unused is None:
            find_unused = bool(cfg.get('find_unused_parameters', False)
                               or (cfg.get('model_wrapper_cfg') or {}).get('find_unused_parameters', False))
        return cls(
            stage=stage, loop=loop, optim=optim, lightning=section,
            work_dir=resolve_work_dir(cfg, work_dir), seed=seed,
            precision=_precision(section, optim, overrides.precision), validates=validates,
            checkpoint=CheckpointPolicy.resolve(section.checkpoint, hooks.get('checkpoint') or {}, validates),
            log_every_n_steps=section.log_every_n_steps or (hooks.get('logger') or {}).get('interval', 50),
            deterministic=deterministic, benchmark=benchmark, find_unused_parameters=bool(find_unused),
            diff_rank_seed=bool(randomness.get('diff_rank_seed', False)))

    @classmethod
    def default_for(cls, cfg: Config, seed: Optional[int] = None) -> 'RunSpec':
        """The spec of a module or data module built from a bare config (no ``train()``):
        ``'fit'`` when the config has a ``train_cfg``, else ``'test'``."""
        return cls.from_config(cfg, 'fit' if cfg.get('train_cfg') else 'test', seed=seed)
