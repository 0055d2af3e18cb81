"""acmix_mm.utils.allocator: glibc keeps freed memory, so a repeated large allocation stops
faulting pages in; and ACMix's projection follows the setting. Each check runs in a fresh
process: the setting is process-wide and must not leak into the test session."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                                reason='mallopt is glibc-only')

# Allocates, touches and frees a 64 MiB tensor six times; prints the minor page faults of each
# round after the first (which faults its pages in under either setting).
_FAULTS = r'''
import json, resource, sys, torch
from acmix_mm.utils.allocator import freed_memory_retained, retain_freed_memory
before = freed_memory_retained()
if sys.argv[1] == 'retain':
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
after = freed_memory_retained()
torch.ones(16 * 2**20).sum()
faults = []
for _ in range(5):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps(dict(before=before, after=after, faults=faults)))
'''


def _run(code, *args, env=None):
    done = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
    default = _run(_FAULTS, 'default')
    retained = _run(_FAULTS, 'retain')
    # 64 MiB of 4 KiB pages is 16,384 faults when a round maps fresh memory. The fewest of a
    # process's rounds: this VM's kernel may still reclaim idle heap pages now and then (DAMON),
    # so a retained round can fault again.
    assert not default['before'] and not default['after']
    assert min(default['faults']) > 15000
    assert not retained['before'] and retained['after']
    assert min(retained['faults']) < 1000


def test_the_environment_setting_counts_as_retained():
    through_env = _run(_FAULTS, 'default', env={'MALLOC_MMAP_MAX_': '0',
                                                  'MALLOC_TRIM_THRESHOLD_': '-1'})
    assert through_env['before'] and min(through_env['faults']) < 1000


_PROJECT = r'''
import json, sys, torch
from acmix_mm.utils.allocator import retain_freed_memory
if sys.argv[1] == 'retain':
    retain_freed_memory()
from acmix_mm.ops.cpp_fused import project
torch.manual_seed(0)
hw = [int(v) for v in sys.argv[2].split('x')]
x = torch.randn(1, 8, *hw)
weight, bias = torch.randn(30, 8), torch.randn(30)
with torch.profiler.profile() as prof:
    out = project(x, weight, bias)
ops = {event.key for event in prof.key_averages()}
want = torch.einsum('pc,bchw->bphw', weight.double(), x.double()) + bias.double().view(1, -1, 1, 1)
print(json.dumps(dict(err=((out - want).abs().max() / want.abs().max()).item(),
                      conv='aten::convolution' in ops, bmm='aten::baddbmm' in ops)))
'''


@pytest.mark.parametrize('setting, size, uses_conv', [
    ('default', '5x7', True),         # 4 KiB of output
    ('default', '300x500', False),    # 17.2 MiB: the batched product
    ('retain', '300x500', True),
])
def test_projection_follows_the_setting(setting, size, uses_conv):
    # oneDNN's convolution where freed memory is kept or the output is under 16 MiB, a batched
    # BLAS product otherwise.
    result = _run(_PROJECT, setting, size)
    assert result['conv'] is uses_conv and result['bmm'] is not uses_conv
    assert result['err'] < 1e-5
