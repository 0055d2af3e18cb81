"""Safe loading of backbone checkpoints, and conversion of the ACMix authors' key layouts.

Loading never executes code from a file. Files are read with ``torch.load(weights_only=True)``:
its unpickler only builds tensors, storages and plain containers and refuses every other global
*before* calling it. On top of torch's allowlist, this module maps a few names onto inert
stand-ins so that the files people actually have can be read:

* ``yacs.config.CfgNode`` (the ``config`` entry of the ACMix authors' Swin checkpoints, Pan et al.,
  "On the Integration of Self-Attention and Convolution", CVPR 2022) becomes a plain
  ``OrderedDict``: none of yacs' code runs, yacs need not even be installed;
* numpy scalars, dtypes and arrays (mmengine's ``meta`` holds numpy scalars) are rebuilt by
  numpy's constructors for data, which call nothing named by the file.

Anything else a pickle names (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any class)
makes :func:`safe_load` raise :class:`CheckpointError` naming the file and the global.

Accepted layouts (:func:`extract_state_dict`): a plain state_dict; ``{'state_dict': ...}``
(mmengine, Lightning); ``{'model': ...}`` (the authors' training scripts). The prefixes
``module.`` (DataParallel), ``model.`` (Lightning) and ``backbone.`` (a whole mmdet/mmseg model,
whose other keys are then dropped) are stripped.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = [
    'CheckpointError', 'LoadReport', 'safe_load', 'extract_state_dict', 'convert_swin_authors',
    'convert_resnet_authors', 'load_backbone_weights', 'load_backbone_state_dict',
]

Converter = Callable[[Mapping[str, torch.Tensor]], Tuple[Dict[str, torch.Tensor], 'LoadReport']]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely, or does not fit the model it is loaded into."""


@dataclasses.dataclass
class LoadReport:
    """What loading did to the file's keys.

    Attributes:
        converted: (file key, model key) pairs that were renamed.
        dropped: (file key, reason) pairs left out on purpose (classifier, recomputed buffers).
        missing: model keys the file does not provide that keep their initial values (allowed).
        loaded: number of model keys taken from the file.
    """
    converted: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)
    loaded: int = 0

    def summary(self) -> str:
        """One line per category, with counts and (short) key lists, for the log."""
        def short(keys: Sequence[str]) -> str:
            keys = list(keys)
            return ', '.join(keys[:6]) + (f', ... ({len(keys)} in all)' if len(keys) > 6 else '')
        reasons = collections.Counter(reason for _, reason in self.dropped)
        dropped = '; '.join(f'{n} {reason}' for reason, n in reasons.items()) or 'none'
        return (f'loaded {self.loaded} keys; renamed {len(self.converted)}; dropped '
                f'{len(self.dropped)} ({dropped}); kept at init {len(self.missing)}'
                + (f' ({short(self.missing)})' if self.missing else ''))


# --------------------------------------------------------------------------- reading files
def _cfgnode_stand_in():
    """Build the stand-in for ``yacs.config.CfgNode``: a plain OrderedDict.

    torch's unpickler creates the object with ``cls.__new__(cls, *args)`` (NEWOBJ), then fills it
    with SETITEMS (allowed on OrderedDict only) and BUILD (which, for an OrderedDict, just sets
    yacs' four flags as attributes). Nothing from yacs runs.
    """
    class CfgNodeStandIn:
        def __new__(cls, *args: Any, **kwargs: Any) -> 'collections.OrderedDict':
            return collections.OrderedDict()
    return CfgNodeStandIn


def _numpy_safe_globals() -> List[Any]:
    """numpy's data constructors, under the names numpy 1.x and 2.x pickle them with."""
    entries: List[Any] = []
    multiarray = getattr(np, '_core', None)
    multiarray = getattr(multiarray, 'multiarray', None) or np.core.multiarray
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries.append((multiarray.scalar, f'{module}.scalar'))
        entries.append((multiarray._reconstruct, f'{module}._reconstruct'))
    entries += [(np.dtype, 'numpy.dtype'), (np.ndarray, 'numpy.ndarray')]
    for name in ('float16', 'float32', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint8',
                 'bool_'):
        dtype_cls = type(np.dtype(getattr(np, name)))
        entries.append((dtype_cls, f'numpy.dtypes.{dtype_cls.__name__}'))
    return entries


def _plain(obj: Any) -> Any:
    """Stand-ins of yacs nodes -> plain dicts, recursively; everything else as is.

    A stand-in is an OrderedDict that received yacs' ``__immutable__`` flag as an attribute;
    other OrderedDicts (state_dicts, with their ``_metadata``) are kept as they are.
    """
    if type(obj) is collections.OrderedDict and '__immutable__' in obj.__dict__:
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) is dict:
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


_GLOBAL_IN_MESSAGE = re.compile(r'(?:GLOBAL|global|function|got) <?([A-Za-z_][\w.]*)')


def _unsafe_globals(path: str) -> List[str]:
    """The globals a file's pickle names, read statically (nothing is unpickled)."""
    try:
        if zipfile.is_zipfile(path):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
        names, strings = [], []
        with open(path, 'rb') as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == 'GLOBAL':
                    names.append(str(arg).replace(' ', '.'))
                elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2:
                    names.append(f'{strings[-2]}.{strings[-1]}')
                elif isinstance(arg, str):
                    strings.append(arg)
        return names
    except Exception:  # noqa: BLE001 -- the names only enrich the error message
        return []


def safe_load(path: str | os.PathLike) -> Any:
    """Read a checkpoint file without executing anything from it.

    Args:
        path: a file written by ``torch.save`` (zip or legacy format).

    Returns:
        The file's object on CPU, with yacs ``CfgNode`` objects turned into plain dicts.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        CheckpointError: the pickle names a global outside tensors, plain containers and numpy
            data (the message names it), or the file is truncated/corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file {path!r} does not exist')
    allowed = [(_cfgnode_stand_in(), 'yacs.config.CfgNode')] + _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if 'WeightsUnpickler error' in message or 'global' in message.lower():
            allowed_names = {name for _, name in allowed}
            names = [g for g in _unsafe_globals(path) if g not in allowed_names]
            if not names:
                match = _GLOBAL_IN_MESSAGE.search(message.split('WeightsUnpickler error:')[-1])
                names = [match.group(1)] if match else ['<unknown>']
            # torch's own wording suggests weights_only=False, the one thing not to do here: keep
            # only its line that says what was refused.
            lines = [ln.strip() for ln in message.split('WeightsUnpickler error:')[-1].splitlines()]
            detail = next((ln for ln in lines if ln and not ln.startswith(
                ('Weights only load failed', 'Check the documentation', 'Please file'))), '')
            detail = f' ({detail})' if detail else ''
            raise CheckpointError(
                f'refusing to load checkpoint {path!r}: its pickle calls or builds '
                f'{", ".join(names)}, which is not plain tensor/container data (nothing of it was '
                f'executed). Only tensors, plain containers, numpy data and yacs CfgNode configs are '
                f'accepted.{detail}') from None
        raise CheckpointError(f'checkpoint {path!r} is corrupt or truncated: {message}') from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError,
            AttributeError, IndexError, TypeError) as err:
        raise CheckpointError(f'checkpoint {path!r} is corrupt, truncated or not a torch.save file: '
                              f'{type(err).__name__}: {err}') from err
    return _plain(obj)


# --------------------------------------------------------------------------- layouts
_STRIPPED_PREFIXES = ('module.', 'model.')


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, path: str = '<checkpoint>',
                       report: Optional[LoadReport] = None) -> 'collections.OrderedDict':
    """The tensors of a loaded checkpoint, with wrapper prefixes removed.

    Args:
        obj: what :func:`safe_load` returned.
        path: the file's name, for error messages.
        report: where keys of a whole detector/segmentor outside ``backbone.`` are recorded as
            dropped.

    Raises:
        CheckpointError: no state_dict found in ``obj``.
    """
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ('state_dict', 'model', 'module'):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
        else:
            keys = sorted(map(str, obj))[:10]
            raise CheckpointError(
                f'checkpoint {path!r} holds no state_dict: expected a mapping of tensors, or one '
                f"under 'state_dict' or 'model'; its top-level keys are {keys}")
    elif not _is_state_dict(obj):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict')
    state = collections.OrderedDict(obj)
    for prefix in _STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = collections.OrderedDict((k[len(prefix):], v) for k, v in state.items())
    if any(k.startswith('backbone.') for k in state):
        # A whole detector/segmentor: keep its backbone only.
        kept = collections.OrderedDict()
        for k, v in state.items():
            if k.startswith('backbone.'):
                kept[k[len('backbone.'):]] = v
            elif report is not None:
                report.dropped.append((k, 'outside backbone'))
        state = kept
    return state


def convert_swin_authors(state: Mapping[str, torch.Tensor],
                         num_stages: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """The authors' Swin-ACmix keys -> :class:`~acmix_mm.models.backbones.SwinACMix` keys.

    ``layers.i.*`` -> ``stages.i.*`` (the block and downsample names inside are the same), the
    final ``norm.*`` -> ``norm{num_stages-1}.*`` (the last stage's output norm); ``head.*``,
    ``*.attn_mask`` and ``*.relative_position_index`` are dropped (the backbone recomputes the two
    buffers for each input size). Keys already in acmix_mm's layout pass unchanged.

    Args:
        state: a state_dict (after :func:`extract_state_dict`).
        num_stages: stages of the model; None infers it from the ``layers.i``/``stages.i`` keys.
    """
    report = LoadReport()
    if num_stages is None:
        indices = [int(m.group(1)) for k in state
                   for m in [re.match(r'(?:layers|stages)\.(\d+)\.', k)] if m]
        num_stages = max(indices) + 1 if indices else 4
    out: Dict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in state.items():
        if key.startswith('head.'):
            report.dropped.append((key, 'classifier'))
            continue
        if key.endswith('.attn_mask') or key.endswith('.relative_position_index'):
            report.dropped.append((key, 'recomputed buffer'))
            continue
        new = key
        if key.startswith('layers.'):
            new = 'stages.' + key[len('layers.'):]
        elif key.startswith('norm.'):
            new = f'norm{num_stages - 1}.' + key[len('norm.'):]
        if new != key:
            report.converted.append((key, new))
        out[new] = value
    return out, report


def convert_resnet_authors(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """The authors' ResNet-ACmix keys are ResNetACMix's; only the classifier ``fc.*`` is dropped."""
    report = LoadReport()
    out: Dict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in state.items():
        if key.startswith('fc.'):
            report.dropped.append((key, 'classifier'))
        else:
            out[key] = value
    return out, report


# --------------------------------------------------------------------------- loading
def _short(keys: Iterable[str], n: int = 12) -> str:
    keys = list(keys)
    return ', '.join(keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def load_backbone_weights(module: nn.Module, path: str | os.PathLike,
                          converter: Optional[Converter] = None,
                          drop_prefixes: Sequence[str] = (),
                          allow_missing: Sequence[str] = (),
                          logger: Optional[str] = 'current') -> LoadReport:
    """Load a checkpoint file into ``module`` safely and strictly, converting its keys.

    Args:
        module: the backbone.
        path: the checkpoint (see the module docstring for the layouts accepted).
        converter: maps the file's state_dict to ``module``'s keys and reports what it did (e.g.
            :func:`convert_swin_authors`); None keeps the keys.
        drop_prefixes: file keys starting with one of these are dropped (e.g. ``('fc.',)``).
        allow_missing: prefixes of ``module`` keys that may be absent from the file and keep
            their initial values (e.g. SwinACMix's extra output norms).
        logger: mmengine logger name for the summary line; None logs nothing.

    Returns:
        The :class:`LoadReport`.

    Raises:
        FileNotFoundError, CheckpointError: unreadable or unsafe file (:func:`safe_load`); keys
            or shapes that do not match ``module`` (the message names them).
    """
    path = os.fspath(path)
    report = LoadReport()
    state = extract_state_dict(safe_load(path), path, report)
    kept = collections.OrderedDict()
    for key, value in state.items():
        if any(key.startswith(p) for p in drop_prefixes):
            report.dropped.append((key, 'classifier'))
        else:
            kept[key] = value
    if converter is not None:
        kept, conv_report = converter(kept)
        report.converted += conv_report.converted
        report.dropped += conv_report.dropped
    own = module.state_dict()
    unexpected = [k for k in kept if k not in own]
    missing = [k for k in own if k not in kept]
    not_allowed = [k for k in missing if not any(k.startswith(p) for p in allow_missing)]
    shapes = [f'{k}: file {tuple(kept[k].shape)} vs model {tuple(own[k].shape)}'
              for k in kept if k in own and kept[k].shape != own[k].shape]
    problems = []
    if unexpected:
        problems.append(f'{len(unexpected)} keys in the file are not in the model: {_short(unexpected)}')
    if not_allowed:
        problems.append(f'{len(not_allowed)} model keys are missing from the file: {_short(not_allowed)}')
    if shapes:
        problems.append(f'{len(shapes)} shapes differ: {_short(shapes, 6)}')
    if problems:
        raise CheckpointError(
            f'checkpoint {path!r} does not fit {type(module).__name__} (another architecture or '
            f'configuration?): ' + '; '.join(problems))
    with torch.no_grad():
        for key, value in kept.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
    report.missing = missing
    report.loaded = len(kept)
    if logger is not None:
        from mmengine.logging import print_log
        print_log(f'{type(module).__name__} <- {path}: {report.summary()}', logger=logger,
                  level=logging.INFO)
    return report


def load_backbone_state_dict(module: nn.Module, path: str | os.PathLike,
                             drop_prefixes: Sequence[str] = (),
                             converter: Optional[Converter] = None,
                             allow_missing: Sequence[str] = ()) -> LoadReport:
    """:func:`load_backbone_weights` with ``drop_prefixes`` first (the ResNet backbones' call)."""
    return load_backbone_weights(module, path, converter=converter, drop_prefixes=drop_prefixes,
                                 allow_missing=allow_missing)
