#!/usr/bin/env python
"""Benchmark the ACMix operator's attention kernels against a 3x3 conv: time and peak memory.

For each shape (B, C, H, W) and device, runs forward+backward (``--mode train``, default) or a
no-grad forward (``--mode infer``) of

- ``unfold``: ``ACMix(C, C, attn_impl='unfold')`` (the straightforward kernel),
- ``lean``: ``ACMix(C, C, attn_impl='lean')`` (the memory-lean PyTorch-ops kernel),
- ``auto``: ``ACMix(C, C)`` as a config builds it (``'cpp'`` on CPU, ``'triton'`` or ``'lean'``
  on CUDA),
- ``cpp``: ``ACMix(C, C, attn_impl='cpp')`` (the C++ CPU kernels, what ``'auto'`` picks on CPU:
  with ``conv_impl='auto'`` both branches run as one fused C++ op; built on first use, which is
  not timed),
- ``cpp-attn``: as ``cpp`` but with ``conv_impl='conv'``: the convolution branch by oneDNN's
  grouped conv instead of its C++ kernel, so the branches run separately (every other ACMix
  row uses ``conv_impl='auto'``),
- ``conv3x3``: ``nn.Conv2d(C, C, 3, padding=1)`` (what ACMix replaces),
- optionally ``lean+compile`` / ``cpp+compile``: ``torch.compile`` of the lean / cpp module
  (compile time excluded),

and prints the median time and the peak memory (see :mod:`acmix_mm.utils.memory`) as markdown
tables (the impls' timed iterations alternate, so that their ratios survive a changing load), with the ratios of each ACMix kernel to unfold and to conv3x3 (where both ran).

Example::

    python tools/benchmark_op.py --shapes 2,64,56,56 1,64,200,336 --iters 3 --threads 2 \
        --impls unfold lean cpp conv3x3
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from acmix_mm.ops import ACMix
from acmix_mm.utils import PeakMemory
from acmix_mm.utils.allocator import retain_freed_memory
from acmix_mm.utils.cli import non_negative_int, positive_int

IMPLS = ('auto', 'unfold', 'lean', 'cpp', 'cpp-attn', 'conv3x3', 'lean+compile', 'cpp+compile')
DEFAULT_SHAPES = ('2,64,56,56', '1,64,200,336')
MODES = ('train', 'infer')
Shape = Tuple[int, int, int, int]


def parse_shape(text: str) -> Shape:
    """'B,C,H,W' -> (B, C, H, W) of positive ints; argparse turns the error into a usage error."""
    parts = text.split(',')
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f'shape must be four positive ints B,C,H,W (e.g. 2,64,56,56), got {text!r}')
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shapes', nargs='+', type=parse_shape,
                        default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar='B,C,H,W',
                        help=f'input shapes (default: {" ".join(DEFAULT_SHAPES)})')
    parser.add_argument('--device', nargs='+', default=['cpu'], choices=['cpu', 'cuda'],
                        help='devices to run on (default: cpu)')
    parser.add_argument('--impls', nargs='+', default=['unfold', 'lean', 'cpp', 'conv3x3'],
                        choices=IMPLS, help='what to run (default: unfold lean cpp conv3x3)')
    parser.add_argument('--mode', choices=MODES, default='train',
                        help='train: forward + backward (default); infer: no-grad forward')
    parser.add_argument('--iters', type=positive_int, default=3,
                        help='timed iterations (median reported; default 3)')
    parser.add_argument('--warmup', type=non_negative_int, default=1,
                        help='untimed iterations first (default 1)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--stride', type=positive_int, default=1,
                        help='operator stride (default 1)')
    parser.add_argument('--retain-freed-memory', action='store_true',
                        help='glibc keeps freed memory in the process (no page faults for the '
                             'next iteration\'s large tensors; acmix_mm.utils.allocator)')
    parser.add_argument('--memory', choices=['allocator', 'rss'], default='allocator',
                        help="peak memory as live tensor bytes ('allocator', default) or as the "
                             "CPU process's RSS ('rss'); see acmix_mm.utils.memory")
    return parser


def build_module(impl: str, channels: int, stride: int) -> nn.Module:
    if impl == 'conv3x3':
        return nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
    if impl == 'cpp-attn':
        return ACMix(channels, channels, stride=stride, attn_impl='cpp', conv_impl='conv')
    module = ACMix(channels, channels, stride=stride, attn_impl=impl.split('+')[0])
    return torch.compile(module) if impl.endswith('+compile') else module


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Case:
    """One impl at one shape: its module, input, and a step (``mode`` of :data:`MODES`)."""

    def __init__(self, impl: str, shape: Shape, device: torch.device, stride: int,
                 mode: str = 'train') -> None:
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        torch.manual_seed(0)
        self.impl, self.device, self.mode = impl, device, mode
        self.module = build_module(impl, shape[1], stride).to(device)
        self.x = torch.randn(*shape, device=device, requires_grad=mode == 'train')
        self.params = list(self.module.parameters())

    def step(self) -> None:
        if self.mode == 'infer':
            with torch.no_grad():
                self.module(self.x)
            return
        self.x.grad = None
        for p in self.params:
            p.grad = None
        self.module(self.x).sum().backward()

    def timed_step(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - start

    def peak_bytes(self, memory: str) -> int:
        """Peak bytes of one step above inputs and parameters, on its own iteration (the CPU
        allocator method runs under the profiler)."""
        self.x.grad = None
        for p in self.params:
            p.grad = None
        with PeakMemory(self.device, memory if self.device.type == 'cpu' else 'allocator') as mem:
            self.step()
        assert mem.peak_bytes is not None
        return mem.peak_bytes


def run_cases(impls: Sequence[str], shape: Shape, device: torch.device, stride: int, iters: int,
              warmup: int, memory: str = 'allocator', mode: str = 'train'
              ) -> Dict[str, Tuple[float, int]]:
    """Median seconds of a step (``mode``: forward+backward or no-grad forward) and peak bytes of
    each impl.

    The impls' timed iterations alternate (A, B, C, A, B, C, ...), so that a change of load on
    a shared machine hits all of them and their ratios stay comparable.
    """
    cases = [Case(impl, shape, device, stride, mode) for impl in impls]
    peaks = {}
    for case in cases:
        for _ in range(warmup + (1 if case.impl.endswith('+compile') else 0)):  # compiles here
            case.step()
        peaks[case.impl] = case.peak_bytes(memory)
    times: Dict[str, List[float]] = {case.impl: [] for case in cases}
    for _ in range(iters):
        for case in cases:
            times[case.impl].append(case.timed_step())
    return {impl: (statistics.median(times[impl]), peaks[impl]) for impl in impls}


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f'{a / b:.3g}' if a is not None and b else 'n/a'


def format_tables(results: Dict[Tuple[Shape, str, str], Optional[Tuple[float, int]]],
                  shapes: Sequence[Shape], devices: Sequence[str], impls: Sequence[str],
                  mode: str = 'train') -> str:
    step = 'fwd+bwd' if mode == 'train' else 'no-grad fwd'
    lines = [f'| shape (B,C,H,W) | device | impl | {step} median (ms) | peak memory (MB) |',
             '|---|---|---|---:|---:|']
    for shape in shapes:
        for dev in devices:
            for impl in impls:
                result = results[(shape, dev, impl)]
                cells = ('n/a (CPU only)', 'n/a') if result is None else (
                    f'{result[0] * 1e3:.1f}', f'{result[1] / 2**20:.1f}')
                lines.append(f'| {",".join(map(str, shape))} | {dev} | {impl} | '
                             f'{cells[0]} | {cells[1]} |')
    kernels = [i for i in impls if i != 'conv3x3']
    pairs = ([(a, 'unfold') for a in kernels if a != 'unfold' and 'unfold' in impls]
             + [(a, 'conv3x3') for a in kernels if 'conv3x3' in impls])
    if pairs:
        header = ' | '.join(f'time {a}/{b} | memory {a}/{b}' for a, b in pairs)
        lines += ['', f'| shape (B,C,H,W) | device | {header} |',
                  '|---|---|' + '---:|' * (2 * len(pairs))]
        for shape in shapes:
            for dev in devices:
                cells = []
                for a, b in pairs:
                    ta, ma = results[(shape, dev, a)] or (None, None)
                    tb, mb = results[(shape, dev, b)] or (None, None)
                    cells += [_ratio(ta, tb), _ratio(ma, mb)]
                lines.append(f'| {",".join(map(str, shape))} | {dev} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if 'cuda' in args.device and not torch.cuda.is_available():
        parser.error('--device cuda was requested but CUDA is not available '
                     f'(torch {torch.__version__}, cuda build: {torch.version.cuda})')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not retain_freed_memory():
        parser.error('--retain-freed-memory needs glibc (Linux); this C library is '
                     f'{platform.libc_ver()[0] or platform.system()}')
    devices = list(dict.fromkeys(args.device))
    impls = list(dict.fromkeys(args.impls))
    results = {}
    for shape in args.shapes:
        for dev in devices:
            # The C++ kernels are CPU-only.
            runnable = [i for i in impls if dev == 'cpu' or not i.startswith('cpp')]
            measured = run_cases(runnable, shape, torch.device(dev), args.stride, args.iters,
                                 args.warmup, args.memory, args.mode)
            for impl in impls:
                results[(shape, dev, impl)] = measured.get(impl)
                if impl in measured:
                    seconds, peak = measured[impl]
                    print(f'# {impl:>12} {dev} {shape}: {seconds * 1e3:.1f} ms, '
                          f'{peak / 2**20:.1f} MB', file=sys.stderr, flush=True)
    print(f'mode {args.mode}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, '
          f'stride {args.stride}, median of {args.iters} after {args.warmup} warm-up, peak memory: '
          f'{args.memory}{", freed memory retained" if args.retain_freed_memory else ""}\n')
    print(format_tables(results, args.shapes, devices, impls, args.mode))
    return 0


if __name__ == '__main__':
    sys.exit(main())
