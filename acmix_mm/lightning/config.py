"""Config helpers of the Lightning wrapper: reading a config, and plain data for checkpoints.

The config's keys are parsed once, into :class:`~acmix_mm.lightning.spec.RunSpec`.
"""
from __future__ import annotations

import collections
import numbers
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from mmengine.config import Config, ConfigDict

ConfigLike = Union[Config, Mapping[str, Any], str, Path]


def as_config(cfg: ConfigLike) -> Config:
    """Return ``cfg`` as an mmengine ``Config`` (a path is read, a dict is wrapped, not copied)."""
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f'config file {str(path)!r} does not exist')
        try:
            return Config.fromfile(str(path))
        except SyntaxError as err:
            # mmengine parses the text itself, so Python reports the file as '<unknown>'.
            raise SyntaxError(f'config file {str(path)!r}, line {err.lineno}: {err.msg}',
                              (str(path), err.lineno, err.offset, err.text)) from None
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


def iter_metric_cfgs(evaluator_cfg: Any) -> Iterable[dict]:
    """The metric configs of an ``*_evaluator`` entry (a metric dict, a list, or an Evaluator dict)."""
    if evaluator_cfg is None:
        return []
    if isinstance(evaluator_cfg, Mapping) and 'metrics' in evaluator_cfg:
        evaluator_cfg = evaluator_cfg['metrics']
    if isinstance(evaluator_cfg, Mapping):
        return [evaluator_cfg]
    return list(evaluator_cfg)
