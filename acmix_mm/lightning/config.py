"""Config helpers shared by the Lightning wrapper: loading, plain-data conversion, loop settings.

mmengine configs describe the training loop with ``train_cfg`` (``EpochBasedTrainLoop`` or
``IterBasedTrainLoop``); :class:`LoopSpec` reads it once so that the trainer, the schedules and
the checkpoint code agree on what an "epoch" and an "iteration" are.

:func:`check_lightning_section` checks every key and value of the optional ``lightning=dict(...)``
section before anything is built, with messages that name the key, the value and what is allowed.
"""
from __future__ import annotations

import collections
import dataclasses
import numbers
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from mmengine.config import Config, ConfigDict, DictAction  # noqa: F401  (DictAction re-exported)

ConfigLike = Union[Config, Mapping[str, Any], str, Path]


def as_config(cfg: ConfigLike) -> Config:
    """Return ``cfg`` as an mmengine ``Config`` (a path is read, a dict is wrapped, not copied)."""
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f'config file {str(path)!r} does not exist')
        return Config.fromfile(str(path))
    if isinstance(cfg, Mapping):
        return Config(dict(cfg))
    raise TypeError(f'a config must be an mmengine Config, a dict or a path, got {type(cfg).__name__}')


def load_config(path: Union[str, Path], cfg_options: Optional[Mapping[str, Any]] = None) -> Config:
    """Read a config file and merge ``--cfg-options`` style ``{'a.b': value}`` overrides into it."""
    cfg = as_config(path)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def to_plain(obj: Any) -> Any:
    """Turn ``obj`` into data that ``torch.load(weights_only=True)`` accepts.

    numpy scalars become Python numbers, numpy arrays become tensors, ``ConfigDict``/``Counter``
    and other mappings become ``dict``, sets become sorted lists; tensors and plain Python values
    pass through. mmengine's metrics and message hub hand out numpy floats, which
    ``weights_only`` rejects, so every checkpoint goes through here before it is written.
    """
    # First: np.float64 subclasses float, yet weights_only refuses it.
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, Config):
        return to_plain(obj.to_dict())
    if isinstance(obj, collections.OrderedDict) and not isinstance(obj, ConfigDict):
        return collections.OrderedDict((to_plain(k), to_plain(v)) for k, v in obj.items())
    if isinstance(obj, Mapping):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_plain(v) for v in obj), key=repr)
    if isinstance(obj, numbers.Number):
        return float(obj) if isinstance(obj, numbers.Real) else complex(obj)
    if isinstance(obj, Path):
        return str(obj)
    # Anything else (a function, a class, an object) would need pickling: store its repr.
    return repr(obj)


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


def iter_metric_cfgs(evaluator_cfg: Any) -> Iterable[dict]:
    """The metric configs of an ``*_evaluator`` entry (a metric dict, a list, or an Evaluator dict)."""
    if evaluator_cfg is None:
        return []
    if isinstance(evaluator_cfg, Mapping) and 'metrics' in evaluator_cfg:
        evaluator_cfg = evaluator_cfg['metrics']
    if isinstance(evaluator_cfg, Mapping):
        return [evaluator_cfg]
    return list(evaluator_cfg)


# ----------------------------------------------------------------------------- lightning section
# What the ``lightning=dict(...)`` section may hold (trainer.py and module.py read it).
LIGHTNING_KEYS = ('accelerator', 'devices', 'num_nodes', 'strategy', 'precision', 'find_unused_parameters',
                  'nan_policy', 'per_sample_seed', 'sync_bn', 'log_every_n_steps', 'num_sanity_val_steps',
                  'enable_progress_bar', 'checkpoint', 'loggers', 'trainer_kwargs')
CHECKPOINT_KEYS = ('save_last', 'save_top_k', 'monitor', 'mode')
ACCELERATORS = ('auto', 'cpu', 'gpu', 'cuda', 'mps', 'tpu')
PRECISIONS = ('32', '32-true', '16-mixed', 'bf16-mixed', '64', '64-true', 'bf16-true', '16-true')
NAN_POLICIES = ('raise', 'skip')
SYNC_BN_MODES = ('auto', 'keep', 'revert')
LOGGERS = ('tensorboard', 'csv')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_devices(value: Any) -> None:
    """Lightning's ``devices``: 'auto', an int >= -1 (-1: all), '2' / '-1' / '0,1', or a list of ids."""
    allowed = ("'auto', an int >= 1 (how many), -1 (all), a string such as '2' or '0,1', "
               'or a list of device ids such as [0, 1]')
    if value == 'auto' or (_is_int(value) and (value >= 1 or value == -1)):
        return
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().rstrip(',').split(',')]
        if parts and all(p.lstrip('-').isdigit() for p in parts) and (len(parts) > 1 or int(parts[0]) != 0):
            return
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value) \
            and len(set(value)) == len(value):
        return
    raise ValueError(f'lightning.devices={value!r} is not valid; allowed: {allowed}')


def _check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f'lightning.{key}={value!r} is not supported; allowed: {", ".join(map(repr, choices))}')


def _check_type(key: str, value: Any, types: tuple, what: str) -> None:
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise TypeError(f'lightning.{key} must be {what}, got {value!r} ({type(value).__name__})')


def check_lightning_section(section: Any) -> Dict[str, Any]:
    """Check the ``lightning=dict(...)`` section and return it as a plain dict.

    Every key is optional. Unknown keys raise naming the closest allowed key; values are checked
    against what Lightning (``accelerator``, ``devices``, ``num_nodes``, ``precision``...) and
    acmix_mm (``nan_policy``, ``sync_bn``, ``checkpoint``, ``loggers``) accept, so that a bad
    value fails before the model, the data or any output is built.

    Args:
        section: the section (None: an empty one).

    Raises:
        TypeError: the section or a value has the wrong type (a list where a dict belongs...).
        ValueError: an unknown key, or a value outside what is allowed.
    """
    from ..registry import unknown_keys_message

    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise TypeError(f'the lightning section must be a dict, e.g. lightning=dict(devices=2), got a '
                        f'{type(section).__name__}: {section!r:.200}')
    section = dict(section)
    unknown = [k for k in section if k not in LIGHTNING_KEYS]
    if unknown:
        raise ValueError(unknown_keys_message('lightning=dict(...)', unknown, LIGHTNING_KEYS, noun='key'))
    if 'accelerator' in section and isinstance(section['accelerator'], str):
        _check_choice('accelerator', section['accelerator'], ACCELERATORS)
    if 'devices' in section:
        _check_devices(section['devices'])
    if 'num_nodes' in section and (not _is_int(section['num_nodes']) or section['num_nodes'] < 1):
        raise ValueError(f'lightning.num_nodes must be an int >= 1, got {section["num_nodes"]!r}')
    if section.get('precision') is not None:
        _check_choice('precision', str(section['precision']), PRECISIONS)
    for key in ('find_unused_parameters', 'enable_progress_bar', 'per_sample_seed'):
        if key in section:
            _check_type(key, section[key], (bool,), 'True or False')
    if 'nan_policy' in section:
        _check_choice('nan_policy', section['nan_policy'], NAN_POLICIES)
    if 'sync_bn' in section:
        _check_choice('sync_bn', section['sync_bn'], SYNC_BN_MODES)
    if section.get('log_every_n_steps') is not None:
        value = section['log_every_n_steps']
        if not _is_int(value) or value < 1:
            raise ValueError(f'lightning.log_every_n_steps must be None or an int >= 1, got {value!r}')
    if 'num_sanity_val_steps' in section:
        value = section['num_sanity_val_steps']
        if not _is_int(value) or value < -1:
            raise ValueError(f'lightning.num_sanity_val_steps must be an int >= -1 (-1: all), got {value!r}')
    if section.get('checkpoint') is not None:
        _check_checkpoint(section['checkpoint'])
    if 'loggers' in section:
        names = section['loggers']
        names = [names] if isinstance(names, str) else names
        _check_type('loggers', names, (list, tuple), f'a name or a list of names from {LOGGERS}')
        for name in names:
            _check_choice('loggers', name, LOGGERS)
    if section.get('trainer_kwargs') is not None:
        _check_type('trainer_kwargs', section['trainer_kwargs'], (Mapping,),
                    'a dict of lightning.pytorch.Trainer arguments')
    return section


def _check_checkpoint(options: Any) -> None:
    from ..registry import unknown_keys_message

    _check_type('checkpoint', options, (Mapping,), f'a dict with keys from {CHECKPOINT_KEYS}')
    unknown = [k for k in options if k not in CHECKPOINT_KEYS]
    if unknown:
        raise ValueError(unknown_keys_message('lightning.checkpoint', unknown, CHECKPOINT_KEYS, noun='key'))
    if 'save_last' in options and options['save_last'] not in (True, False, 'link'):
        raise ValueError(f"lightning.checkpoint.save_last must be True, False or 'link', got {options['save_last']!r}")
    top_k = options.get('save_top_k')
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise ValueError(f'lightning.checkpoint.save_top_k must be None or an int >= -1 (-1: all), got {top_k!r}')
    if options.get('monitor') is not None:
        _check_type('checkpoint.monitor', options['monitor'], (str,), 'a metric name (str) or None')
    if options.get('mode') is not None:
        _check_choice('checkpoint.mode', options['mode'], ('min', 'max'))
