"""Safe loading of backbone checkpoints, and conversion of the ACMix authors' key layouts.

Loading never executes code from a file. Files are read with ``torch.load(weights_only=True)``:
its unpickler only builds tensors, storages and plain containers and refuses every other global
*before* calling it. On top of torch's allowlist, this module maps a few names onto inert
stand-ins so that the files people actually have can be read:

* ``yacs.config.CfgNode`` (the ``config`` entry of the ACMix authors' Swin checkpoints, Pan et al.,
  "On the Integration of Self-Attention and Convolution", CVPR 2022) becomes a plain
  ``OrderedDict``: none of yacs' code runs, yacs need not even be installed;
* numpy scalars, dtypes and arrays are rebuilt by a fixed allow-list of numpy's data
  constructors: ``numpy.core.multiarray.scalar`` and ``._reconstruct`` (also under numpy 2's
  ``numpy._core`` name), ``numpy.dtype``, ``numpy.ndarray`` and the dtype classes of the bool,
  int, uint8 and float types. mmengine writes numpy scalars into its ``meta``, so refusing them
  would refuse ordinary mmengine/mmdet/mmseg files. These constructors build data from bytes
  and a dtype; they call nothing the file names (an object array's items go through the same
  restricted unpickler).

* mmengine's ``HistoryBuffer`` (the ``message_hub`` of every mmengine Runner checkpoint) becomes
  an :class:`InertObject`, read back as ``{'__class__': name, **attributes}``; the
  ``builtins.getattr`` its pickled statistics methods use is a stand-in that returns a
  placeholder string for such objects and refuses any other (:func:`_inert_getattr`).

Anything else a pickle names (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any class)
makes :func:`safe_load` raise :class:`CheckpointError` naming the file and the global; torch's
unpickler refuses it before calling it, so nothing of the file runs. Empty, truncated, corrupt
and non-torch files (JSON, text, random bytes) raise :class:`CheckpointError` saying which.
:func:`check_state_dict_fits` gives the one "does not fit" message (missing, unexpected and
mis-shaped keys, counted per component) used by the backbones and the Lightning entry points.

Accepted layouts (:func:`extract_state_dict`): a plain state_dict; ``{'state_dict': ...}``
(mmengine, Lightning); ``{'model': ...}`` (the authors' training scripts). The prefixes
``module.`` (DataParallel), ``model.`` (Lightning) and ``backbone.`` (a whole mmdet/mmseg model,
whose other keys are then dropped) are stripped.
"""
from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..ops import ACMix
from ..ops.replaced_conv import replaced_conv_keys, replaced_conv_summary

__all__ = [
    'CheckpointError', 'LoadReport', 'safe_load', 'extract_state_dict', 'convert_swin_authors',
    'convert_resnet_authors', 'load_backbone_weights', 'load_backbone_state_dict',
    'check_state_dict_fits', 'display_global', 'ALLOWED_EXTRA_GLOBALS', 'take_replaced_convs',
    'resolve_checkpoint',
]

# LoadReport.dropped reason of a conv tensor where the model has an ACMix layer.
REPLACED_CONV = 'replaced conv'

Converter = Callable[[Mapping[str, torch.Tensor]], Tuple[Dict[str, torch.Tensor], 'LoadReport']]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely, or does not fit the model it is loaded into."""


@dataclasses.dataclass
class LoadReport:
    """What loading did to the file's keys.

    Attributes:
        converted: (file key, model key) pairs that were renamed.
        dropped: (file key, reason) pairs left out on purpose (classifier, recomputed buffers,
            the weights of convs that ACMix layers replace).
        missing: model keys the file does not provide that keep their initial values (allowed).
        loaded: number of model keys taken from the file.
        replaced_layers: ACMix layers standing where the file has a conv (a stock ResNet file):
            their conv tensors are in ``dropped``, their ACMix tensors in ``missing``.
    """
    converted: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)
    loaded: int = 0
    replaced_layers: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: counts per category, short key lists, and the replaced convs in one phrase."""
        def short(keys: Sequence[str]) -> str:
            keys = list(keys)
            return ', '.join(keys[:6]) + (f', ... ({len(keys)} in all)' if len(keys) > 6 else '')
        prefixes = tuple(f'{layer}.' for layer in self.replaced_layers)
        kept_acmix = [k for k in self.missing if prefixes and k.startswith(prefixes)]
        others = [k for k in self.missing if not (prefixes and k.startswith(prefixes))]
        counters = [k for k in others if k.endswith('num_batches_tracked')]
        others = [k for k in others if not k.endswith('num_batches_tracked')]
        reasons = collections.Counter(reason for _, reason in self.dropped
                                      if reason != REPLACED_CONV)
        dropped = '; '.join(f'{n} {reason}' for reason, n in reasons.items()) or 'none'
        n_dropped = sum(reasons.values())
        line = (f'loaded {self.loaded} keys; renamed {len(self.converted)}; dropped '
                f'{n_dropped} ({dropped}); kept at init {len(others)}'
                + (f' ({short(others)})' if others else ''))
        if counters:
            line += f'; {len(counters)} BN num_batches_tracked counters not in the file (start at 0)'
        if self.replaced_layers:
            unused = sum(1 for _, reason in self.dropped if reason == REPLACED_CONV)
            line += '; ' + replaced_conv_summary(self.replaced_layers, unused, len(kept_acmix))
        return line


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


class InertObject:
    """What a known data-only class of mmengine becomes when read: its name and its attributes.

    mmengine's Runner writes its ``message_hub`` (``HistoryBuffer`` objects holding numpy arrays
    of logged losses) into every checkpoint. torch's unpickler creates the object with
    ``cls.__new__(cls)`` (NEWOBJ) and sets its pickled ``__dict__`` (BUILD); with this class
    standing in for the original, none of mmengine's code runs. :func:`_plain` then turns it into
    ``{'__class__': name, **attributes}``.
    """

    pickled_name = ''

    def __new__(cls, *args: Any, **kwargs: Any) -> 'InertObject':
        return object.__new__(cls)


def _inert_stand_in(name: str) -> type:
    return type('InertObject', (InertObject,), {'pickled_name': name})


# Data-only classes whose pickles appear in ordinary checkpoints (mmengine Runner files).
INERT_CLASSES = ('mmengine.logging.history_buffer.HistoryBuffer',)


def _inert_getattr(obj: Any, name: Any) -> str:
    """Stands in for ``builtins.getattr``, which pickles of bound methods call.

    A ``HistoryBuffer`` pickles its statistics methods (``{'min': HistoryBuffer.min, ...}``) as
    ``getattr(HistoryBuffer, 'min')``. On an :class:`InertObject` stand-in (class or instance)
    this returns a placeholder string
    (no attribute is looked up, nothing is bound or called); on anything else it refuses, so the
    name cannot reach attributes of real objects.
    """
    inert = isinstance(obj, InertObject) or (isinstance(obj, type) and issubclass(obj, InertObject))
    if inert and isinstance(name, str):
        return f'<{obj.pickled_name}.{name}>'
    raise pickle.UnpicklingError(
        f'GLOBAL builtins.getattr refused: it reads attributes of {", ".join(INERT_CLASSES)} objects '
        f'only, not of a {type(obj).__name__}')


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
    """Stand-ins of yacs nodes and inert objects -> plain dicts, recursively; the rest as is.

    A yacs stand-in is an OrderedDict that received yacs' ``__immutable__`` flag as an attribute;
    other OrderedDicts (state_dicts, mmengine's message_hub) stay OrderedDicts, attributes such
    as a state_dict's ``_metadata`` included.
    """
    if isinstance(obj, InertObject):
        return {'__class__': obj.pickled_name, **{k: _plain(v) for k, v in vars(obj).items()}}
    if type(obj) is collections.OrderedDict and '__immutable__' in obj.__dict__:
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) is collections.OrderedDict:  # e.g. mmengine's message_hub; state_dicts keep _metadata
        out = collections.OrderedDict((k, _plain(v)) for k, v in obj.items())
        out.__dict__.update(obj.__dict__)
        return out
    if type(obj) is dict:
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


_GLOBAL_IN_MESSAGE = re.compile(r'GLOBAL ([A-Za-z_][\w.]*)')
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80  # the first byte of a binary pickle (legacy torch.save files and pickle.dump)
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError,
                OSError, AttributeError, IndexError, TypeError, UnicodeDecodeError, MemoryError)


def _canonical_global(name: str) -> str:
    """A pickled global's Python 3 name: ``commands.Popen`` -> ``subprocess.Popen``.

    Files written with pickle protocol 2 (torch.save's default) store Python-2 module names
    (``subprocess`` is written ``commands``, ``builtins`` ``__builtin__``), and ``os`` functions
    live in ``posix``/``nt``.
    """
    module, _, attr = name.rpartition('.')
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module in ('posix', 'nt'):
        module = 'os'
    return f'{module}.{attr}' if module else attr


def display_global(name: str) -> str:
    """A pickled global's name as a reader knows it: ``posix.system`` -> ``os.system (stored as
    posix.system)``."""
    shown = _canonical_global(name)
    return shown if shown == name else f'{shown} (stored as {name})'


def _refusable(names: Iterable[str]) -> List[str]:
    """The names neither torch's weights_only allowlist nor :data:`ALLOWED_EXTRA_GLOBALS` holds."""
    try:  # torch's default allowlist (tensors, storages, dtypes, OrderedDict, ...); private API
        from torch._weights_only_unpickler import _get_allowed_globals
        torch_allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 -- without it every name is reported, which is still safe
        torch_allowed = set()
    allowed = torch_allowed | set(ALLOWED_EXTRA_GLOBALS)
    return [n for n in names if n not in allowed and _canonical_global(n) not in allowed]


def _pickle_globals(data: bytes) -> List[str]:
    """The globals a pickle names, read statically with pickletools (nothing is unpickled).

    Reads up to the first opcode pickletools cannot parse (a truncated or corrupt stream) and
    returns what it found before it.
    """
    names: List[str] = []
    strings: List[str] = []
    memo: Dict[int, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == 'GLOBAL':
                names.append(str(arg).replace(' ', '.'))
            elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2:
                names.append(f'{strings[-2]}.{strings[-1]}')
            elif opcode.name in ('BINPUT', 'LONG_BINPUT', 'PUT') and strings:
                memo[arg] = strings[-1]
            elif opcode.name == 'MEMOIZE' and strings:
                memo[len(memo)] = strings[-1]
            elif opcode.name in ('BINGET', 'LONG_BINGET', 'GET') and isinstance(memo.get(arg), str):
                strings.append(memo[arg])
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 -- a damaged stream: keep the names read so far
        pass
    return list(dict.fromkeys(names))


def _file_globals(path: str) -> List[str]:
    """The globals a checkpoint's pickle names (zip or legacy/raw pickle), without unpickling."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
                return _pickle_globals(archive.read(pickles[0])) if pickles else []
        with open(path, 'rb') as f:
            return _pickle_globals(f.read())
    except Exception:  # noqa: BLE001 -- the names only enrich the error message
        return []


def _describe_start(head: bytes) -> str:
    """What a file that is not a torch.save file looks like, from its first bytes."""
    text = head.lstrip()
    if text[:1] in (b'{', b'['):
        kind = 'JSON/text'
    else:
        try:
            head.decode('utf-8')
            kind = 'text'
        except UnicodeDecodeError:
            kind = 'binary data of an unknown format'
    return f'it starts with {head[:16]!r}, which looks like {kind}'


def _check_zip_records(path: str) -> None:
    """Check a zip checkpoint's layout and every record's CRC-32 before torch reads it.

    torch's reader does not check the CRCs that torch.save writes, so a damaged tensor record
    (a bad disk, a broken copy) would load as silently wrong weights. Reading the records once
    more costs about a second per GB.

    Raises:
        CheckpointError: no ``data.pkl`` (a zip, but not torch.save's), or a record whose bytes
            differ from those written.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip() if any(n.endswith('data.pkl') for n in names) else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise CheckpointError(f'checkpoint {path!r} is truncated or corrupt: its zip records cannot be '
                              f'read ({type(err).__name__}: {err})') from None
    if not any(n.endswith('data.pkl') for n in names):
        raise CheckpointError(f'checkpoint {path!r} is a zip archive but not a torch.save checkpoint: '
                              f'it has no data.pkl (its entries: {_short(names, 5)})')
    if bad is not None:
        raise CheckpointError(f'checkpoint {path!r} is corrupt: its record {bad!r} fails the CRC-32 '
                              'check (the bytes on disk differ from those torch.save wrote)')


def _allowed_globals() -> List[Tuple[Any, str]]:
    """The (object, pickled name) pairs safe_load adds to torch's weights_only allowlist."""
    return ([(_cfgnode_stand_in(), 'yacs.config.CfgNode')] + _numpy_safe_globals()
            + [(_inert_stand_in(name), name) for name in INERT_CLASSES]
            + [(_inert_getattr, 'builtins.getattr')])


ALLOWED_EXTRA_GLOBALS: Tuple[str, ...] = tuple(name for _, name in _allowed_globals())


def _refuse(path: str, names: Sequence[str], detail: str = '') -> CheckpointError:
    shown = ', '.join(display_global(n) for n in names)
    return CheckpointError(
        f'refusing to load checkpoint {path!r}: its pickle calls or builds {shown}, which is not '
        f'plain tensor/container data (nothing of it was executed). Only tensors, plain containers, '
        f'numpy data (scalars, dtypes, arrays) and yacs CfgNode configs are accepted.{detail}')


def safe_load(path: str | os.PathLike) -> Any:
    """Read a checkpoint file without executing anything from it: acmix_mm's one reader.

    Every entry point (``tools/test.py``, ``tools/train.py --resume``, ``load_from``, the
    backbones' ``init_cfg=dict(type='Pretrained')``) reads files through this function, so a
    bad file gives the same message everywhere.

    Args:
        path: a file written by ``torch.save`` (zip or legacy format).

    Returns:
        The file's object on CPU, with yacs ``CfgNode`` objects and mmengine ``HistoryBuffer``
        objects turned into plain dicts (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        CheckpointError: the pickle names a global outside tensors, plain containers and numpy
            data (the message names it; nothing was executed); the file is empty, truncated,
            corrupt or not a torch.save file (the message says which).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f'checkpoint {path!r} is a directory, not a checkpoint file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file {path!r} does not exist')
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f'checkpoint {path!r} is empty (0 bytes): not a torch.save file '
                              '(was its writing interrupted?)')
    with open(path, 'rb') as f:
        head = f.read(64)
    is_zip_start = head.startswith(_ZIP_MAGIC)
    if is_zip_start and not zipfile.is_zipfile(path):
        # torch.save's zip format ends with the archive's directory: without it, the file was cut.
        raise CheckpointError(f'checkpoint {path!r} is truncated or corrupt: a torch.save zip archive '
                              f'of {size} bytes without its end (central directory); the file was cut '
                              'short, e.g. by an interrupted write or copy')
    if is_zip_start:
        _check_zip_records(path)
    elif head[0] != _PICKLE_PROTO:
        # Not a zip and not a binary pickle: torch.load would read it as an old-style pickle and
        # fail on a random opcode. Old ASCII pickles (protocol 0) still go to the unpickler below,
        # which names what they import.
        names = _refusable(_file_globals(path))
        if names:
            raise _refuse(path, names)
        raise CheckpointError(f'checkpoint {path!r} is not a torch.save file: {_describe_start(head)}')
    allowed = _allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # torch warns about a pickle protocol it may not parse; a failure is reported below.
            warnings.filterwarnings('ignore', message='Detected pickle protocol', category=UserWarning)
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except _READ_ERRORS as err:
        message = str(err).split('WeightsUnpickler error:')[-1]
        # A refused global, or a pickle torch's reader cannot parse (e.g. protocol 4 FRAMEs of a
        # plain pickle.dump) that names one: either way the message names the globals.
        names = _refusable(_file_globals(path))
        match = _GLOBAL_IN_MESSAGE.search(message)
        detail = ''
        if match and not names:
            # An allowed name used outside what its stand-in accepts (see _inert_getattr).
            names = [match.group(1)]
            refused = re.search(r'GLOBAL [\w.]+ refused: ([^\n]*)', message)
            detail = f' ({refused.group(1)})' if refused else ''
        if names:
            raise _refuse(path, names, detail) from None
        if isinstance(err, zipfile.BadZipFile) or (is_zip_start and 'data.pkl' in message):
            raise CheckpointError(f'checkpoint {path!r} is a zip archive but not a torch.save '
                                  f'checkpoint: {err}') from None
        # torch's wording suggests weights_only=False, the one thing not to do here; its first
        # line with content says what broke.
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if not ln.startswith(
            ('Weights only load failed', 'Check the documentation', 'Please file'))), '') or repr(err)
        raise CheckpointError(f'checkpoint {path!r} is truncated or corrupt ({size} bytes; reading '
                              f'it failed with {type(err).__name__}: {detail})') from None
    return _plain(obj)


# --------------------------------------------------------------------------- fitting a model
def _by_component(keys: Sequence[str]) -> str:
    """``neck.* 12, roi_head.* 40``: how many keys each top-level component holds."""
    counts = collections.Counter(k.split('.', 1)[0] + ('.*' if '.' in k else '') for k in keys)
    return ', '.join(f'{name} {n}' for name, n in counts.most_common(6)) + (
        ', ...' if len(counts) > 6 else '')


def check_state_dict_fits(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                          path: str, target: str, allow_missing: Sequence[str] = (),
                          limit: int = 10) -> List[str]:
    """Check that the checkpoint ``found`` holds exactly the tensors of ``expected``.

    Args:
        expected: the model's state_dict (names -> tensors).
        found: the file's state_dict, after layout and key conversion.
        path: the file, for the message.
        target: what it is loaded into, e.g. ``'ResNetACMix'`` or ``'MaskRCNN'``.
        allow_missing: prefixes of model keys the file may lack (they keep their values).
        limit: keys listed per category in the message.

    Returns:
        The model keys missing from the file that ``allow_missing`` allows.

    Raises:
        CheckpointError: keys missing or unexpected, or shapes that differ: the message lists
            them, with a count per top-level component (``neck.* 12``) to tell another
            architecture (different components) from another configuration (same keys,
            other shapes).
    """
    missing = [k for k in expected if k not in found]
    not_allowed = [k for k in missing if not any(k.startswith(p) for p in allow_missing)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}'
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    for title, items, grouped in (('model keys missing from the checkpoint', not_allowed, True),
                                  ('checkpoint keys not in the model', unexpected, True),
                                  ('shape mismatches', shapes, False)):
        if items:
            groups = f' ({_by_component(items)})' if grouped else ''
            problems.append(f'{len(items)} {title}{groups}: {_short(items, limit)}')
    if problems:
        raise CheckpointError(
            f'checkpoint {path!r} does not fit {target} (a checkpoint of another model or '
            f'configuration?): ' + '; '.join(problems))
    return missing


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


def take_replaced_convs(state: Mapping[str, torch.Tensor], model: nn.Module,
                        report: LoadReport) -> Dict[str, torch.Tensor]:
    """A stock network's file, for ``model`` whose ACMix layers stand where it has convs.

    For every :class:`~acmix_mm.ops.ACMix` in ``model`` (say ``layer2.0.conv2``) whose keys the
    file lacks but which has ``layer2.0.conv2.weight`` of the replaced conv's shape (C_out, C_in,
    k, k), that weight (and a ``bias`` of shape (C_out,)) is dropped as ``REPLACED_CONV`` and the
    layer is added to ``report.replaced_layers``: its ACMix tensors may be missing. Files
    without any ``num_batches_tracked`` (torchvision's ImageNet ResNets) may lack those
    counters too. Everything else is left for the fit check.

    Returns:
        The state without the dropped tensors; the ``allow_missing`` prefixes are
        ``report.replaced_layers`` (with a trailing dot) and, where dropped, the counters.
    """
    out = collections.OrderedDict(state)
    for name, module in model.named_modules():
        if not isinstance(module, ACMix):
            continue
        unused = replaced_conv_keys(module, out, f'{name}.')
        if unused is None:
            continue  # ACMix keys for this layer (an ACMix file), or no conv: checked as usual
        for key in unused:
            del out[key]
            report.dropped.append((key, REPLACED_CONV))
        report.replaced_layers.append(name)
    return out


def _allowed_missing_counters(model: nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    """BN ``num_batches_tracked`` keys of ``model`` when the file has none at all."""
    if any(k.endswith('num_batches_tracked') for k in state):
        return []
    return [k for k in model.state_dict() if k.endswith('num_batches_tracked')]


_URI_SCHEMES = ('torchvision://', 'http://', 'https://')


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """A local file for ``checkpoint``: a path, ``torchvision://NAME`` or an http(s) URL.

    ``torchvision://resnet50`` is the URL mmengine gives that name (its
    ``hub/torchvision_0.12.json``, torchvision's ImageNet weights); URLs are fetched once into
    torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where mmengine and torchvision keep them
    too), written to a temporary name and renamed when complete. The file is then read by
    :func:`safe_load` like any other.

    Raises:
        ValueError: an unknown scheme or torchvision name (the message lists what is allowed).
    """
    checkpoint = os.fspath(checkpoint)
    if '://' not in checkpoint:
        return checkpoint
    if checkpoint.startswith('torchvision://'):
        import mmengine
        names = mmengine.load(os.path.join(mmengine.__path__[0], 'hub', 'torchvision_0.12.json'))
        name = checkpoint[len('torchvision://'):]
        if name not in names:
            raise ValueError(f'unknown torchvision checkpoint {checkpoint!r}; allowed names: '
                             f'{", ".join(sorted(names))}')
        url = names[name]
    elif checkpoint.startswith(('http://', 'https://')):
        url = checkpoint
    else:
        raise ValueError(f'checkpoint {checkpoint!r}: unknown scheme; allowed: a file path or '
                         f'{", ".join(s + "..." for s in _URI_SCHEMES)}')
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, os.path.basename(url.split('?')[0]))
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        partial = f'{path}.{os.getpid()}.partial'
        try:
            torch.hub.download_url_to_file(url, partial, progress=False)
            os.replace(partial, path)
        except Exception as err:
            if os.path.exists(partial):
                os.remove(partial)
            raise CheckpointError(f'checkpoint {checkpoint!r}: downloading {url} into {path} failed '
                                  f'({type(err).__name__}: {err}); put the file there by hand or '
                                  'name a local path') from None
    return path


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
    path = resolve_checkpoint(path)
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
        report.replaced_layers += conv_report.replaced_layers
        allow_missing = tuple(allow_missing) + tuple(f'{n}.' for n in conv_report.replaced_layers)
        if conv_report.replaced_layers:
            allow_missing += tuple(_allowed_missing_counters(module, kept))
    own = module.state_dict()
    missing = check_state_dict_fits(own, kept, path, type(module).__name__, allow_missing)
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
