"""Builds and loads acmix_mm's C++ CPU kernels (``csrc/``) on first use.

One extension holds both kernels: the local attention (``csrc/local_attention.cpp``) and the
convolution branch (``csrc/shift_conv.cpp``), bound in ``csrc/extension.cpp``; ninja compiles
the three files in parallel.

The extension is compiled just in time with :func:`torch.utils.cpp_extension.load` (g++ and
ninja) the first time it is needed on a machine, into a cache directory, and loaded from there
afterwards without a rebuild. The directory name contains the torch version and a hash of the
source, the compiler flags and the CPU's instruction-set flags (the code is built with
``-march=native``), so a torch upgrade, an edited kernel or a different CPU sharing the cache
builds a fresh copy instead of loading a stale or illegal one. Concurrent builds are safe:
within a process a lock serialises them, across processes torch's file baton in the build
directory does.

Cache location: ``$ACMIX_MM_EXTENSIONS_DIR`` if set, else ``~/.cache/acmix_mm/torch_extensions``.
Set ``ACMIX_MM_DISABLE_CPP=1`` to never build it (``attn_impl='auto'`` then uses ``'lean'``,
``conv_impl='auto'`` ``'conv'``).
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
from types import ModuleType
from typing import List, Optional

import torch

__all__ = ['SOURCES', 'extension_name', 'build_directory', 'load_extension', 'is_loaded',
           'require_extension', 'extension_available', 'extension_error']

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
SOURCES: List[str] = [os.path.join(_CSRC, name) for name in
                      ('extension.cpp', 'local_attention.cpp', 'shift_conv.cpp')]
# Hashed with the sources: an edited header must rebuild too.
_HEADERS: List[str] = [os.path.join(_CSRC, name) for name in ('local_attention.h', 'shift_conv.h')]
# -O3 for the vectorised x loops; OpenMP so that at::parallel_for uses torch's thread pool
# (libgomp is shared with torch by soname, so torch.set_num_threads applies).
_CFLAGS: List[str] = ['-O3', '-march=native', '-mprefer-vector-width=512', '-fopenmp']
_LDFLAGS: List[str] = ['-fopenmp']

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; the platform name elsewhere)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    """``acmix_mm_cpu_kernels_<torch version>_<12-hex hash of sources, flags and CPU>``."""
    digest = hashlib.sha256()
    for path in SOURCES + _HEADERS:
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(_CFLAGS + _LDFLAGS).encode())
    digest.update(_cpu_flags().encode())
    version = ''.join(c if c.isalnum() else '_' for c in torch.__version__)
    return f'acmix_mm_cpu_kernels_{version}_{digest.hexdigest()[:12]}'


def build_directory() -> str:
    """Where the extension named :func:`extension_name` is built and cached."""
    root = os.environ.get('ACMIX_MM_EXTENSIONS_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'acmix_mm', 'torch_extensions')
    return os.path.join(root, extension_name())


def load_extension() -> Optional[ModuleType]:
    """The compiled module (``forward``/``backward`` of the attention,
    ``shift_conv_forward``/``shift_conv_backward``), or None if it cannot be built; the reason is then :func:`extension_error`. Builds at most once per process."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get('ACMIX_MM_DISABLE_CPP', '') not in ('', '0'):
            _error = 'disabled by ACMIX_MM_DISABLE_CPP'
            return None
        try:
            from torch.utils.cpp_extension import load
            directory = build_directory()
            os.makedirs(directory, exist_ok=True)
            _module = load(name=extension_name(), sources=SOURCES, extra_cflags=_CFLAGS,
                           extra_ldflags=_LDFLAGS, build_directory=directory, verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
            _error = f'{type(exc).__name__}: {_first_error_line(str(exc))}'
        return _module


def _first_error_line(log: str) -> str:
    """The build log's first line saying what went wrong (compiler error, missing program),
    else its last line: the whole log is too long for a warning."""
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    for line in lines:
        lower = line.lower()
        if 'error:' in lower or 'not found' in lower or 'no such file' in lower:
            return line
    return lines[-1] if lines else 'unknown error'


def require_extension(user: str, instead: str) -> ModuleType:
    """The loaded extension, or a ``RuntimeError`` saying that ``user`` needs it, why it could
    not be built, and what to use ``instead``."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f'{user}: the C++ extension could not be built ({_error}); use '
                           f'{instead}')
    return ext


def extension_available() -> bool:
    """True if the C++ kernel is (or can now be) built and loaded."""
    return load_extension() is not None


def extension_error() -> Optional[str]:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _error


def is_loaded() -> bool:
    """True if the extension is already loaded in this process (never starts a build)."""
    return _module is not None
