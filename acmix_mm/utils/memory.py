"""Peak memory of a piece of code, on CPU or CUDA, resettable within one process.

Two ways of measuring, both reported in bytes *above the level when the measurement
started* (tensors alive before it, such as inputs and parameters, do not count), so that
several callables measured one after another in one process are comparable:

- ``'allocator'`` (default): bytes of live tensors, as torch's allocator sees them.
  CUDA: the caching allocator's counters (``torch.cuda.reset_peak_memory_stats`` /
  ``max_memory_allocated``). CPU: torch has no such counters, so the body runs under
  ``torch.profiler`` with ``profile_memory=True``, and the peak is the running sum of its
  allocation/free events in time order. Deterministic (the same code gives the same bytes),
  independent of malloc's behaviour; the profiler slows the body down, so time it separately.
- ``'rss'`` (CPU only): the process's resident-set high-water mark, i.e. what the OS sees,
  including malloc fragmentation and non-torch memory. Writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` (Linux >= 4.0), so the kernel records the peak
  with nothing missed; before that the Python garbage is collected and glibc hands free heap
  pages back (``malloc_trim(0)``). Where ``clear_refs`` is not writable, a thread samples
  psutil's RSS every ``interval`` seconds instead (spikes shorter than that can be missed).
  glibc serves tensors below its (dynamic, up to 32 MB) mmap threshold from a heap whose
  freed pages it may keep, so RSS peaks vary by a few tens of percent between runs.

"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import threading
from typing import Any, Callable, Optional, Tuple

import torch

__all__ = ['PeakMemory', 'measure_peak_memory', 'settled_rss_bytes']

_STATUS = '/proc/self/status'
_CLEAR_REFS = '/proc/self/clear_refs'


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf'^{field}:\s+(\d+) kB', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f'{field} not found in {_STATUS}')
    return int(match.group(1))


def _can_reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, 'w') as f:
            f.write('5')
        _status_kib('VmHWM')
        return True
    except (OSError, RuntimeError):
        return False


def _release_free_heap() -> None:
    """Collect garbage and return glibc's free heap pages to the OS (no-op elsewhere)."""
    gc.collect()
    libc_name = ctypes.util.find_library('c')
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _rss_bytes() -> int:
    import psutil  # a runtime dependency; imported here to keep the package import light
    return psutil.Process().memory_info().rss


def settled_rss_bytes() -> int:
    """The process's RSS in bytes after collecting garbage and handing glibc's free heap pages
    back, so that freed-but-kept pages do not read as growth (what a leak check compares)."""
    gc.collect()
    _release_free_heap()
    return _rss_bytes()


class PeakMemory:
    """Context manager measuring the peak memory of its body on ``device``.

    Example::

        with PeakMemory('cpu') as mem:
            model(x).sum().backward()
        print(mem.peak_bytes, mem.method)

    Args:
        device: ``'cpu'`` or ``'cuda'`` (or a ``torch.device``).
        method: ``'allocator'`` (live tensor bytes; default) or ``'rss'`` (CPU process RSS).
        interval: sampling period in seconds, only for the ``'rss'`` fallback sampler.

    Attributes (after exit): ``peak_bytes`` (peak above the level at entry, >= 0) and
    ``method`` (``'cuda_allocator'``, ``'cpu_allocator'``, ``'vmhwm'`` or ``'rss_sampling'``).
    """

    def __init__(self, device: str | torch.device = 'cpu', method: str = 'allocator',
                 interval: float = 1e-3) -> None:
        self.device = torch.device(device)
        if self.device.type not in ('cpu', 'cuda'):
            raise ValueError(f"PeakMemory: device must be 'cpu' or 'cuda', got {str(device)!r}")
        if self.device.type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('PeakMemory: CUDA is not available in this torch build/machine')
        if method not in ('allocator', 'rss'):
            raise ValueError(f"PeakMemory: method must be 'allocator' or 'rss', got {method!r}")
        if method == 'rss' and self.device.type != 'cpu':
            raise ValueError("PeakMemory: method 'rss' measures host memory; use device 'cpu'")
        if interval <= 0:
            raise ValueError(f'PeakMemory: interval must be > 0 seconds, got {interval}')
        self.requested = method
        self.interval = interval
        self.peak_bytes: Optional[int] = None
        self.method: Optional[str] = None
        self._base = 0
        self._sampled_peak = 0
        self._profiler: Optional[torch.profiler.profile] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> 'PeakMemory':
        gc.collect()
        if self.device.type == 'cuda':
            self.method = 'cuda_allocator'
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.requested == 'allocator':
            self.method = 'cpu_allocator'
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        else:
            _release_free_heap()
            if _can_reset_hwm():
                self.method = 'vmhwm'
                self._base = _status_kib('VmRSS') * 1024
            else:
                self.method = 'rss_sampling'
                self._base = self._sampled_peak = _rss_bytes()
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.method == 'cuda_allocator':
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == 'cpu_allocator':
            assert self._profiler is not None
            self._profiler.__exit__(*exc)
            peak = _peak_of_cpu_events(self._profiler)
            self._profiler = None
        elif self.method == 'vmhwm':
            peak = _status_kib('VmHWM') * 1024
        else:
            assert self._stop is not None and self._thread is not None
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled_peak, _rss_bytes())
        self.peak_bytes = max(0, peak - self._base)


def _peak_of_cpu_events(prof: torch.profiler.profile) -> int:
    """Max running sum of the profiler's CPU allocation (+) / free (-) events, in time order."""
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError('PeakMemory: the profiler recorded no results')
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device = 'cpu',
                        method: str = 'allocator') -> Tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes above the level before the call)``."""
    with PeakMemory(device, method) as mem:
        result = fn()
    assert mem.peak_bytes is not None
    return result, mem.peak_bytes
