"""acmix_mm.utils.memory: peak memory of a callable, resettable within one process."""
from __future__ import annotations

import time

import pytest
import torch

from acmix_mm.utils import PeakMemory, measure_peak_memory
from acmix_mm.utils import memory as memory_module

MB = 2 ** 20


def _hold(numel: int, seconds: float = 0.0):
    def fn():
        t = torch.ones(numel)
        time.sleep(seconds)
        return float(t[0])
    return fn


def test_allocator_peak_is_exact_and_resets():
    # 40 MB then 8 MB: the second measurement must not inherit the first's peak.
    assert measure_peak_memory(_hold(10 * MB))[1] == 40 * MB
    assert measure_peak_memory(_hold(2 * MB))[1] == 8 * MB


def test_allocator_peak_counts_frees_and_excludes_prior_tensors():
    prior = torch.ones(4 * MB)  # alive before: not counted

    def fn():
        a = torch.ones(MB)
        del a  # freed before the next allocation: the peak is one of them, not both
        b = torch.ones(2 * MB)
        return b.sum() + prior[0]

    with PeakMemory('cpu') as mem:
        fn()
    assert mem.method == 'cpu_allocator'
    assert 8 * MB <= mem.peak_bytes <= 8 * MB + 1024  # + the few bytes of the scalar results


@pytest.mark.parametrize('hwm', [True, False])
def test_rss_peak(monkeypatch, hwm):
    if not hwm:  # the fallback sampler, as on systems without a writable clear_refs
        monkeypatch.setattr(memory_module, '_can_reset_hwm', lambda: False)
    big = measure_peak_memory(_hold(25 * MB, 0.05), method='rss')[1]
    small = measure_peak_memory(_hold(5 * MB, 0.05), method='rss')[1]
    assert 90 * MB <= big <= 120 * MB, big / MB
    assert 15 * MB <= small <= 35 * MB, small / MB


def test_bad_arguments():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'meta'"):
        PeakMemory('meta')
    with pytest.raises(ValueError, match="method must be 'allocator' or 'rss', got 'vms'"):
        PeakMemory('cpu', method='vms')
    with pytest.raises(ValueError, match='interval must be > 0'):
        PeakMemory('cpu', method='rss', interval=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error raised without CUDA')
def test_cuda_without_cuda_raises():
    with pytest.raises(RuntimeError, match='CUDA is not available'):
        PeakMemory('cuda')
