"""What the ACMix backbones share: argument checks, and ``init_weights`` that keeps the shift init.

Argument checks: every subclass's ``__init__`` is wrapped (:meth:`ACMixBackbone.__init_subclass__`)
so that a keyword it does not take (a misspelt ``depht=50`` or ``attn_imp='lean'`` in a config)
raises a ``TypeError`` naming the backbone, the key, its closest allowed key and every allowed key,
before anything is built. The check lives in the class, not in a registry's build function, so it
holds however the backbone is built: ``acmix_mm.registry.build_model``, mmdet's or mmseg's
``MODELS.build`` building a whole detector or segmentor, or a direct call. The explicit
signatures stay (``inspect.signature`` and ``help()`` show them).

The ``check_*`` helpers below give the backbones one wording for bad values: the argument's name,
the value and what is allowed.
"""
from __future__ import annotations

import functools
import inspect
import logging
import numbers
from collections.abc import Sequence
from typing import Any, Callable, Optional

from mmengine.logging import print_log
from mmengine.model import BaseModule

from ...registry import unknown_keys_message


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """Return ``value`` if it is an int (not a bool) in [low, high], else raise naming it.

    Raises:
        TypeError: not an int (e.g. ``'50'``, ``2.0``, ``True``).
        ValueError: outside [low, high] (``high=None``: no upper bound).
    """
    allowed = f'>= {low}' if high is None else f'in [{low}, {high}]'
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be an int {allowed}, got {value!r} ({type(value).__name__})')
    if value < low or (high is not None and value > high):
        raise ValueError(f'{name} must be {allowed}, got {value}')
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``True``/``False``, not 0/1), else raise a TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f'{name} must be a bool (True or False), got {value!r} ({type(value).__name__})')
    return value


def check_float(name: str, value: Any, low: float, high: float, high_open: bool = True) -> float:
    """Return ``value`` as a float if it is a real number in [low, high) (or [low, high]).

    Raises:
        TypeError: not a real number (a str, None, a bool...).
        ValueError: outside the interval, or NaN.
    """
    interval = f'[{low}, {high})' if high_open else f'[{low}, {high}]'
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a number in {interval}, got {value!r} ({type(value).__name__})')
    value = float(value)
    inside = low <= value < high if high_open else low <= value <= high
    if not inside:  # NaN fails both comparisons
        raise ValueError(f'{name} must be in {interval}, got {value}')
    return value


def check_sequence(name: str, value: Any, what: str) -> tuple:
    """``value`` as a tuple if it is a list/tuple (not a str, dict or scalar), else a TypeError.

    Args:
        what: what the sequence holds, for the message (e.g. ``'stage indices in [0, 3]'``).
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f'{name} must be a list or tuple of {what}, got {value!r} '
                        f'({type(value).__name__})')
    return tuple(value)


def check_per_stage(name: str, value: Any, num_stages: int, default: tuple,
                    check: Callable[[str, Any], Any]) -> tuple:
    """A per-stage argument as a tuple of ``num_stages`` checked values (None: ``default`` cut)."""
    if value is None:
        return tuple(default[:num_stages])
    value = check_sequence(name, value, f'{num_stages} values, one per stage')
    if len(value) != num_stages:
        raise ValueError(f'{name} must have one entry per stage (num_stages={num_stages}), '
                         f'got {len(value)}: {value!r}')
    return tuple(check(f'{name}[{i}]', v) for i, v in enumerate(value))


def check_out_indices(value: Any, num_stages: int, name: str = 'out_indices') -> tuple[int, ...]:
    """Stage indices to output: a non-empty list/tuple of distinct ints in [0, num_stages)."""
    what = f'stage indices in [0, {num_stages - 1}]'
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        raise TypeError(f'{name} must be a list or tuple of {what}, got the int {value}; '
                        f'for one stage write ({value},)')
    indices = check_sequence(name, value, what)
    if not indices:
        raise ValueError(f'{name} is empty: name at least one stage to output ({what})')
    for i in indices:
        check_int(f'each of {name}', i, 0, num_stages - 1)
    if len(set(indices)) != len(indices):
        raise ValueError(f'{name} has duplicates: {indices}; each stage may be output once')
    return indices


def check_init_cfg(init_cfg: Any) -> None:
    """``init_cfg`` must be None, a dict with a ``type`` key, or a list of such dicts."""
    if init_cfg is None:
        return
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    if not all(isinstance(c, dict) and 'type' in c for c in cfgs):
        raise TypeError('init_cfg must be None, a dict with a "type" key or a list of such '
                        f'dicts, got {init_cfg!r}')


def _checked_init(init: Callable, owner: str) -> Callable:
    """Wrap a backbone ``__init__`` so that unknown or missing arguments raise naming them."""
    signature = inspect.signature(init)
    params = list(signature.parameters.values())[1:]  # without self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return init  # takes anything: nothing to check against
    allowed = [p.name for p in params
               if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        unknown = [key for key in kwargs if key not in allowed]
        if unknown:
            raise TypeError(unknown_keys_message(f'backbone {owner}', unknown, allowed))
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f'backbone {owner}: {err}; its arguments are {", ".join(allowed)}') from None
        init(self, *args, **kwargs)

    wrapper.__acmix_checked__ = True
    return wrapper


class ACMixBackbone(BaseModule):
    """Base of the ACMix backbones.

    Every subclass's ``__init__`` refuses unknown keyword arguments with a message naming the
    backbone, the key, the closest allowed key and every allowed key (module docstring).

    ``init_weights`` runs, in order: the backbone's own default init (``_default_init``); any
    non-``Pretrained`` mmengine initialisers in ``init_cfg``, after which ACMix's shift init is
    re-applied (``_reset_acmix``) because generic ``Conv2d`` initialisers would overwrite it (the
    authors' ResNet lost it that way); then every ``Pretrained`` entry through the backbone's
    ``load_pretrained``, which uses acmix_mm's safe loader instead of mmengine's (the authors'
    files hold a pickled yacs ``CfgNode`` that ``torch.load(weights_only=True)`` refuses).

    Subclasses implement ``_default_init()``, ``_reset_acmix()`` and ``load_pretrained(path)``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get('__init__')
        if init is not None and not getattr(init, '__acmix_checked__', False):
            cls.__init__ = _checked_init(init, cls.__name__)

    def init_weights(self) -> None:
        """Initialise as ``init_cfg`` says (see the class docstring)."""
        if self._is_init:
            print_log(f'init_weights of {type(self).__name__} has been called more than once.',
                      logger='current', level=logging.WARNING)
            return
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        for cfg in cfgs:
            if cfg is not None and not (isinstance(cfg, dict) and 'type' in cfg):
                raise TypeError(f'each init_cfg must be a dict with a "type" key, got {cfg!r}')
        pretrained = [c for c in cfgs if c is not None and c['type'] == 'Pretrained']
        others = [c for c in cfgs if c is not None and c['type'] != 'Pretrained']
        self._default_init()
        if not pretrained:
            print_log(f'{type(self).__name__}: no init_cfg Pretrained, so every layer starts from '
                      'its own init (training from scratch). A from-scratch detector needs a '
                      'recipe made for it (GN, a long schedule: configs/acmix_resnet/'
                      '*-scratch_fpn_gn-all_6x_coco.py); on a 1x schedule expect a poor model.',
                      logger='current', level=logging.WARNING)
        if others:
            init_cfg, self.init_cfg = self.init_cfg, others
            super().init_weights()
            self.init_cfg = init_cfg
            self._reset_acmix()
        for cfg in pretrained:
            if 'checkpoint' not in cfg:
                raise ValueError(f'init_cfg {cfg!r} needs a checkpoint path')
            self.load_pretrained(cfg['checkpoint'])
        self._is_init = True

    def _default_init(self) -> None:
        raise NotImplementedError

    def _reset_acmix(self) -> None:
        raise NotImplementedError

    def load_pretrained(self, path: str):
        raise NotImplementedError
