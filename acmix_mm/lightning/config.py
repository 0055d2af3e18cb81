"""Config helpers shared by the Lightning wrapper: loading, plain-data conversion, loop settings.

mmengine configs describe the training loop with ``train_cfg`` (``EpochBasedTrainLoop`` or
``IterBasedTrainLoop``); :class:`LoopSpec` reads it once so that the trainer, the schedules and
the checkpoint code agree on what an "epoch" and an "iteration" are.
"""
from __future__ import annotations

import collections
import dataclasses
import numbers
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

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
        loop_type = train_cfg.get('type')
        by_epoch = train_cfg.get('by_epoch')
        if loop_type in cls._EPOCH_TYPES or (loop_type is None and by_epoch is not False):
            by_epoch = True
        elif loop_type in cls._ITER_TYPES or (loop_type is None and by_epoch is False):
            by_epoch = False
        else:
            raise ValueError(f'train_cfg.type={loop_type!r} is not supported; allowed: '
                             'EpochBasedTrainLoop, IterBasedTrainLoop')
        val_interval = int(train_cfg.get('val_interval', 1))
        if val_interval < 1:
            raise ValueError(f'train_cfg.val_interval must be >= 1, got {val_interval}')
        if by_epoch:
            max_epochs = _positive_int(train_cfg, 'max_epochs')
            return cls(True, max_epochs, None, val_interval, int(train_cfg.get('val_begin', 1)))
        max_iters = _positive_int(train_cfg, 'max_iters')
        return cls(False, None, max_iters, val_interval, int(train_cfg.get('val_begin', 1)))

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


def _positive_int(section: Mapping[str, Any], key: str) -> int:
    value = section.get(key)
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
