"""The optimiser and the parameter schedules of an mmengine config, for Lightning.

The optimiser (with ``paramwise_cfg``) is built by mmengine's own ``build_optim_wrapper``; the
schedules (``param_scheduler``) are mmengine's schedulers, built on that wrapper exactly as
mmengine's ``Runner`` builds them (default ``end`` from the train loop, ``epoch_length`` for
``convert_to_iter_based``). :class:`SchedulerStepper` then steps them when mmengine's
``ParamSchedulerHook`` would: the iteration-based ones after every training iteration
(every batch, also under gradient accumulation, as mmengine counts iterations), the
epoch-based ones at the end of every training epoch.

What the optimiser wrapper asks of the training loop, and Lightning does itself (gradient
clipping, mixed precision, accumulation), is read once into
:class:`~acmix_mm.lightning.spec.OptimSettings`.
"""
from __future__ import annotations

import collections
import copy
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.optim.scheduler import _ParamScheduler
from mmengine.registry import PARAM_SCHEDULERS

from .spec import LoopSpec

# Keys of AmpOptimWrapper that Lightning's precision plugin takes over.
_AMP_KEYS = ('dtype', 'loss_scale', 'use_fsdp')


def build_optimizer(model: torch.nn.Module, optim_cfg: Mapping[str, Any]) -> OptimWrapper:
    """Build ``optim_wrapper`` (optimizer + ``paramwise_cfg``) with mmengine's builder.

    The wrapper is always a plain ``OptimWrapper``: mixed precision, clipping and accumulation
    are Lightning's job (see :class:`OptimSettings`), so their keys are removed here and
    ``AmpOptimWrapper`` (which insists on a GPU) is never instantiated.
    """
    cfg = copy.deepcopy(dict(optim_cfg))
    if 'optimizer' not in cfg:
        raise ValueError("optim_wrapper needs an 'optimizer', e.g. optimizer=dict(type='SGD', lr=0.02)")
    cfg['type'] = 'OptimWrapper'
    for key in _AMP_KEYS + ('clip_grad', 'accumulative_counts'):
        cfg.pop(key, None)
    return build_optim_wrapper(model, ConfigDict(cfg))


def clip_gradients(optimizer: torch.optim.Optimizer, clip_grad: dict) -> Optional[torch.Tensor]:
    """Clip the gradients of ``optimizer``'s parameters as mmengine's ``OptimWrapper`` does.

    Returns the total gradient norm before clipping (norm clipping), else None.
    """
    params = [p for group in optimizer.param_groups for p in group['params']
              if p.requires_grad and p.grad is not None]
    if not params:
        return None
    kwargs = dict(clip_grad)
    if kwargs.pop('type', 'norm') == 'value':
        torch.nn.utils.clip_grad_value_(params, **kwargs)
        return None
    return torch.nn.utils.clip_grad_norm_(params, **kwargs)


def build_param_schedulers(scheduler_cfg: Any, optim_wrapper: Union[OptimWrapper, torch.optim.Optimizer], loop: LoopSpec,
                           epoch_length: int) -> List[_ParamScheduler]:
    """Build ``param_scheduler`` on ``optim_wrapper`` as mmengine's Runner does.

    Args:
        scheduler_cfg: one scheduler dict or a list of them (None gives no schedulers).
        optim_wrapper: the wrapper (or torch optimiser) whose param groups the schedules drive.
        loop: the training loop; a scheduler without ``end`` ends with it (max_epochs for
            epoch-based schedulers, max_iters for iteration-based ones), as in mmengine.
        epoch_length: training batches per epoch, for ``convert_to_iter_based``.
    """
    if scheduler_cfg is None:
        return []
    cfgs: Sequence = [scheduler_cfg] if isinstance(scheduler_cfg, Mapping) else list(scheduler_cfg)
    # mmengine: an IterBasedTrainLoop counts one epoch; an EpochBasedTrainLoop max_epochs*len iters.
    max_epochs = loop.max_epochs if loop.by_epoch else 1
    max_iters = loop.max_iters if not loop.by_epoch else loop.max_epochs * epoch_length
    schedulers = []
    for cfg in cfgs:
        if not isinstance(cfg, Mapping):
            raise TypeError(f'a param_scheduler entry must be a dict, got {cfg!r}')
        cfg = copy.deepcopy(dict(cfg))
        cfg.setdefault('end', max_epochs if cfg.get('by_epoch', True) else max_iters)
        schedulers.append(PARAM_SCHEDULERS.build(
            ConfigDict(cfg), default_args=dict(optimizer=optim_wrapper, epoch_length=epoch_length)))
    return schedulers


class SchedulerStepper:
    """Steps mmengine schedulers at the moments mmengine's ``ParamSchedulerHook`` does."""

    def __init__(self, schedulers: Sequence[_ParamScheduler]):
        self.schedulers = list(schedulers)

    def after_train_iter(self) -> None:
        """After every training iteration (batch): the iteration-based schedules."""
        for scheduler in self.schedulers:
            if not scheduler.by_epoch:
                scheduler.step()

    def after_train_epoch(self) -> None:
        """At the end of every training epoch: the epoch-based schedules."""
        for scheduler in self.schedulers:
            if scheduler.by_epoch:
                scheduler.step()

    def state_dict(self) -> List[dict]:
        return [scheduler.state_dict() for scheduler in self.schedulers]

    def load_state_dict(self, states: Sequence[dict]) -> None:
        if len(states) != len(self.schedulers):
            raise ValueError(f'the checkpoint holds {len(states)} parameter schedulers, '
                             f'the config builds {len(self.schedulers)}')
        for scheduler, state in zip(self.schedulers, states):
            state = dict(state)
            # Checkpoints hold plain dicts (see config.to_plain); give Counters their type back.
            for key, value in state.items():
                if isinstance(getattr(scheduler, key, None), collections.Counter) and isinstance(value, dict):
                    state[key] = collections.Counter(value)
            scheduler.load_state_dict(state)
