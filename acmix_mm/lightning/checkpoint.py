"""Checkpoint layout shared by Lightning and mmengine, and safe loading of model weights.

A checkpoint written through :class:`~acmix_mm.lightning.MMLightningModule` is at once

* a Lightning checkpoint (``trainer.fit(ckpt_path=...)`` resumes from it), and
* an mmengine/mmdet/mmseg checkpoint: ``state_dict`` holds the wrapped model's own keys
  (``backbone.conv1.weight``, not ``model.backbone.conv1.weight``) and ``meta`` holds
  ``dataset_meta``, so ``mmengine.runner.load_checkpoint(model, path)`` and
  ``mmdet.apis.init_detector(cfg, path)`` load it with their default arguments.

The module strips the ``model.`` prefix when saving and puts it back when Lightning loads
(``STATE_DICT_LAYOUT`` marks such files). Everything else in the file is plain data
(:func:`~acmix_mm.lightning.config.to_plain`), so ``torch.load(weights_only=True)`` reads it:
loading a checkpoint never runs code from it.
"""
from __future__ import annotations

import collections
import os
import pickle
from typing import Any, Dict, List, Mapping, Tuple

import torch

STATE_DICT_LAYOUT_KEY = 'state_dict_layout'
STATE_DICT_LAYOUT = 'mmengine'
MODEL_PREFIX = 'model.'


def strip_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> 'collections.OrderedDict':
    """``model.x`` -> ``x`` (keys without the prefix are kept as they are), metadata included."""
    out = collections.OrderedDict(
        (k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(
            (k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else ('' if k == 'model' else k), v)
            for k, v in metadata.items())
    return out


def add_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> 'collections.OrderedDict':
    """``x`` -> ``model.x``: the keys of the LightningModule that wraps the model."""
    out = collections.OrderedDict((MODEL_PREFIX + k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(
            ((MODEL_PREFIX + k) if k else 'model', v) for k, v in metadata.items())
    return out


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (nothing in the file is executed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint that loads as plain data.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f'checkpoint {path!r} cannot be read as plain data (weights_only=True): {err}') from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a dict')
    return dict(checkpoint)


def model_state_dict(checkpoint: Mapping[str, Any]) -> 'collections.OrderedDict':
    """The wrapped model's weights from a checkpoint of any of the layouts we meet.

    Accepts our layout, a Lightning checkpoint of a module holding the model as ``model``,
    an mmengine checkpoint (``state_dict`` or ``model`` key), or a bare state dict.
    """
    for key in ('state_dict', 'model'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state_dict = checkpoint[key]
            break
    else:
        state_dict = checkpoint
    if checkpoint.get(STATE_DICT_LAYOUT_KEY) != STATE_DICT_LAYOUT and state_dict and all(
            k.startswith(MODEL_PREFIX) for k in state_dict):
        state_dict = strip_model_prefix(state_dict)
    # DDP-wrapped saves (mmengine's MMDistributedDataParallel) carry a `module.` prefix.
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = collections.OrderedDict((k[len('module.'):], v) for k, v in state_dict.items())
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError('the checkpoint has no state dict of tensors (looked at keys '
                         f'"state_dict", "model" and the top level: {sorted(checkpoint)[:10]})')
    return collections.OrderedDict(state_dict)


def compare_state_dicts(expected: Mapping[str, torch.Tensor],
                        found: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """Missing keys, unexpected keys and ``key: shape vs shape`` mismatches between two state dicts."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}'
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, shapes


def check_compatible(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     limit: int = 10) -> None:
    """Raise ValueError listing mismatched keys/shapes if ``state_dict`` is not ``model``'s."""
    missing, unexpected, shapes = compare_state_dicts(model.state_dict(), state_dict)
    if not (missing or unexpected or shapes):
        return
    lines = [f'checkpoint {source!r} does not fit the model {type(model).__name__} '
             '(a checkpoint of another architecture?):']
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('shape mismatches', shapes)):
        if items:
            more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
            lines.append(f'  {len(items)} {title}: {", ".join(items[:limit])}{more}')
    raise ValueError('\n'.join(lines))


def load_model_weights(model: torch.nn.Module, path: str) -> Dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model`` strictly; returns the checkpoint.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint_file`; a checkpoint of another
            architecture raises ValueError listing the mismatched keys and shapes.
    """
    checkpoint = load_checkpoint_file(path)
    state_dict = model_state_dict(checkpoint)
    check_compatible(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return checkpoint
