"""Build a config's model for a tool: ONNX export, FLOPs and the benchmark share this.

A tool wants the model exactly as the config describes it, built in this process and without
the side effects of training: the config's ``default_scope`` (mmdet or mmseg) and its model
registry, SyncBN reverted to BN (there is no process group), seeded initial weights, and no
``Pretrained`` file (weights do not change what a model costs or how it exports, and the files
need not be on disk). It also needs one default input size:

* mmdet configs: :data:`DEFAULT_DET_SHAPE` = 800 x 1344, mmdet's 1333 x 800 test scale with
  the width padded to the detectors' ``pad_size_divisor`` of 32, which is what the network sees;
* mmseg configs: the config's ``crop_size``, else :data:`DEFAULT_SEG_SHAPE` = 512 x 512.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .registry import build_model

__all__ = ['SCOPES', 'DEFAULT_DET_SHAPE', 'DEFAULT_SEG_SHAPE', 'ToolModel', 'resolve_config_path',
           'load_tool_config', 'config_scope',
           'default_input_shape', 'without_pretrained', 'build_tool_model']

SCOPES = ('mmdet', 'mmseg')
DEFAULT_DET_SHAPE = (800, 1344)
DEFAULT_SEG_SHAPE = (512, 512)


def resolve_config_path(name: str) -> str:
    """A config path on disk for ``name``: a file path, or ``package::relative/path.py`` of an
    installed OpenMMLab package (its ``.mim/configs`` folder, as mmengine's ``_base_`` does)."""
    if '::' in name:
        package, _, rel = name.partition('::')
        if package not in SCOPES:
            raise ValueError(f'config {name!r}: the package prefix must be one of '
                             f'{", ".join(p + "::" for p in SCOPES)}, got {package + "::"!r}')
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f'config {name!r}: package {package!r} is not installed')
        path = os.path.join(spec.submodule_search_locations[0], '.mim', 'configs', rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'config {name!r}: {package} has no config {rel!r} '
                                    f'(looked for {path})')
        return path
    if not os.path.isfile(name):
        raise FileNotFoundError(f'config file not found: {name}')
    return name


def load_tool_config(name: str, cfg_options: Optional[Mapping[str, Any]] = None):
    """The mmengine Config of ``name`` (a path, or ``mmdet::``/``mmseg::`` + a path in that
    package's configs), with ``--cfg-options`` merged."""
    from mmengine.config import Config

    cfg = Config.fromfile(resolve_config_path(name))
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def config_scope(cfg: Any, what: str = 'this tool') -> str:
    """The config's ``default_scope`` if it is ``'mmdet'`` or ``'mmseg'``, else a ValueError."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(f"{what} handles configs with default_scope 'mmdet' or 'mmseg', got {scope!r}")
    if not cfg.get('model'):
        raise ValueError('the config has no model section')
    return scope


def default_input_shape(cfg: Any) -> Tuple[int, int]:
    """(H, W) in pixels: 800 x 1344 for mmdet configs, the crop size (else 512 x 512) for mmseg."""
    if cfg.get('default_scope') == 'mmseg':
        crop = cfg.get('crop_size')
        return (int(crop[0]), int(crop[1])) if crop else DEFAULT_SEG_SHAPE
    return DEFAULT_DET_SHAPE


def without_pretrained(node: Any) -> Tuple[Any, int]:
    """A copy of a model config without ``Pretrained`` init_cfgs and with ``pretrained=None``.

    Returns:
        (the copy, how many were dropped).
    """
    dropped = 0

    def is_pretrained(init: Any) -> bool:
        return isinstance(init, Mapping) and init.get('type') == 'Pretrained'

    def walk(obj: Any) -> Any:
        nonlocal dropped
        if isinstance(obj, Mapping):
            out = {}
            for key, value in obj.items():
                if key == 'init_cfg' and is_pretrained(value):
                    dropped += 1
                    out[key] = None
                elif key == 'init_cfg' and isinstance(value, (list, tuple)):
                    kept = [v for v in value if not is_pretrained(v)]
                    dropped += len(value) - len(kept)
                    out[key] = [walk(v) for v in kept] or None
                elif key == 'pretrained' and isinstance(value, str):
                    dropped += 1
                    out[key] = None
                else:
                    out[key] = walk(value)
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        return obj

    return walk(node), dropped


def _models_registry(scope: str):
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


@dataclasses.dataclass
class ToolModel:
    """What :func:`build_tool_model` returns.

    Attributes:
        model: the built model (SyncBN reverted; training mode, as built).
        scope: ``'mmdet'`` or ``'mmseg'``.
        model_cfg: the plain model config it was built from (``Pretrained`` entries removed).
        dropped_pretrained: how many ``Pretrained`` init_cfgs (and ``pretrained=`` keys) were dropped.
    """
    model: nn.Module
    scope: str
    model_cfg: dict
    dropped_pretrained: int


def build_tool_model(cfg: Any, seed: int = 0, what: str = 'this tool',
                     preprocessor_size: Optional[Sequence[int]] = None) -> ToolModel:
    """Build the model of an mmdet/mmseg config as the module docstring describes.

    Args:
        cfg: an mmengine ``Config`` (``default_scope`` 'mmdet' or 'mmseg', a ``model`` section).
        seed: ``torch.manual_seed`` before building, so that the modules' initial weights repeat.
        what: the tool's name, for the scope error.
        preprocessor_size: for mmseg, the pad target of the data preprocessor (``size``), when a
            tool feeds images of another size than the crop size.

    Raises:
        ValueError: another scope, or no model section.
    """
    from mmengine.config import ConfigDict
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope, init_default_scope

    scope = config_scope(cfg, what)
    model_cfg = cfg.model.to_dict() if isinstance(cfg.model, ConfigDict) else dict(cfg.model)
    model_cfg, dropped = without_pretrained(model_cfg)
    preprocessor = model_cfg.get('data_preprocessor') or {}
    if scope == 'mmseg' and preprocessor_size is not None and preprocessor.get('size') is not None:
        # mmseg pads every image to this size (the crop size); a larger input would be cut by
        # a negative pad, so the pad target follows the tool's input.
        preprocessor['size'] = tuple(preprocessor_size)
    init_default_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(seed)
        model = revert_sync_batchnorm(build_model(ConfigDict(model_cfg), registry=_models_registry(scope)))
    return ToolModel(model, scope, model_cfg, dropped)
