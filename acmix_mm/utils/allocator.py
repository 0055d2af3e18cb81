"""Keep freed CPU memory in the process: no page faults for the next step's large tensors.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so a training
step that allocates large activation and gradient maps pays for the kernel's page faults and
zero-filling of every one of them, every step: system time of about a third of user time for a
ResNet-ACMix backbone at 800x1344 (``docs/benchmarks.md#allocation``).

:func:`retain_freed_memory` tells glibc (``mallopt``) to serve all blocks from its heap and to
keep freed memory there, so after the first step the next ones reuse the same pages. The cost is
that the process's resident memory stays at its peak instead of shrinking between steps (what a
GPU's caching allocator does too). It changes the whole process, not only acmix_mm's tensors,
so it is opt-in: ``tools/train.py``, ``tools/benchmark.py``, ``tools/benchmark_op.py`` and
``tools/benchmark_record.py`` take ``--retain-freed-memory``. ACMix's fused CPU path reads
:func:`freed_memory_retained` to choose how it runs its projection
(:func:`acmix_mm.ops.cpp_fused.project`). The same effect without code: start Python with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`` in the environment.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from typing import Optional

__all__ = ['retain_freed_memory', 'freed_memory_retained']

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt(3): a trim threshold of -1 disables trimming.
_TRIM_NEVER = -1

_retained = False


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    # Cached: freed_memory_retained() runs on every ACMix forward, and find_library may spawn
    # a subprocess.
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    return libc if hasattr(libc, 'mallopt') else None


def retain_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never give freed heap memory back.

    Affects allocations made after the call. Returns True if set (or already set), False where
    the C library is not glibc (macOS, musl, Windows): nothing is changed there.
    """
    global _retained
    if _retained:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
    _retained = bool(ok)
    return _retained


def freed_memory_retained() -> bool:
    """Whether large blocks come from glibc's heap in this process: :func:`retain_freed_memory`
    took effect, or the process started with ``MALLOC_MMAP_MAX_=0``."""
    return _retained or (os.environ.get('MALLOC_MMAP_MAX_') == '0' and _glibc() is not None)
