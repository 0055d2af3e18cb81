"""Reading checkpoint files without executing anything from them.

Files are read with ``torch.load(weights_only=True)``: its unpickler only builds tensors,
storages and plain containers and refuses every other global *before* calling it. On top of
torch's allowlist, a few names are mapped onto inert stand-ins so that the files people actually
have can be read:

* ``yacs.config.CfgNode`` (the ``config`` entry of the ACMix authors' Swin checkpoints, Pan et al.,
  "On the Integration of Self-Attention and Convolution", CVPR 2022) becomes a plain
  ``OrderedDict``: none of yacs' code runs, yacs need not even be installed;
* numpy scalars, dtypes and arrays are rebuilt by a fixed allow-list of numpy's data
  constructors: ``numpy.core.multiarray.scalar`` and ``._reconstruct`` (also under numpy 2's
  ``numpy._core`` name), ``numpy.dtype``, ``numpy.ndarray`` and the dtype classes of the bool,
  int, uint8 and float types. mmengine writes numpy scalars into its ``meta``, so refusing them
  would refuse ordinary mmengine/mmdet/mmseg files. These constructors build data from bytes
  and a dtype; they call nothing the file names (an object array's items go through the same
  restricted unpickler);
* mmengine's ``HistoryBuffer`` (the ``message_hub`` of every mmengine Runner checkpoint) becomes
  an :class:`InertObject`, read back as ``{'__class__': name, **attributes}``; the
  ``builtins.getattr`` its pickled statistics methods use is a stand-in that returns a
  placeholder string for such objects and refuses any other (:func:`_inert_getattr`).

Anything else a pickle names (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any class)
makes :func:`safe_load` raise :class:`CheckpointError` naming the file and the global; torch's
unpickler refuses it before calling it, so nothing of the file runs. Empty, truncated, corrupt
and non-torch files (JSON, text, random bytes) raise :class:`CheckpointError` saying which.
"""
from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch

__all__ = ['CheckpointError', 'safe_load', 'load_checkpoint_dict', 'display_global',
           'ALLOWED_EXTRA_GLOBALS', 'short_list']


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely, or does not fit the model it is loaded into."""



def short_list(keys: Iterable[str], n: int = 12) -> str:
    """The first ``n`` of ``keys``, comma-separated, with the total when some are left out."""
    keys = list(keys)
    return ', '.join(keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


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
                              f'it has no data.pkl (its entries: {short_list(names, 5)})')
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



def load_checkpoint_dict(path: str | os.PathLike) -> Dict[str, Any]:
    """The dict a checkpoint file holds, read by :func:`safe_load`.

    ``tools/test.py``, ``--resume``, ``load_from``, the export tool and the backbones'
    ``Pretrained`` init read files through :func:`safe_load`, so the same bad file gives the
    same message everywhere.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError (a ValueError): empty, truncated, corrupt, non-torch or unsafe file, or
            a file that holds no dict.
    """
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'checkpoint {os.fspath(path)!r} holds a {type(checkpoint).__name__}, not '
                              'a dict of a model checkpoint (state_dict, meta, ...)')
    return dict(checkpoint)
