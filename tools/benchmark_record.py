#!/usr/bin/env python
"""The benchmark record: every ACMix-vs-baseline ratio the README quotes, in one table.

Each comparison runs in its own fresh process (so that one model's memory never counts in the
next one's peak), with A and B alternating their iterations inside it (see ``tools/benchmark.py``
and ``tools/benchmark_op.py``, which do the measuring):

- ``layer-56``, ``layer-200``: one ``ACMix(64, 64)`` layer (default kernels) against
  ``nn.Conv2d(64, 64, 3, padding=1)``, at B2 C64 56x56 and B1 C64 200x336;
- ``resnet50``: the ResNet-ACMix-50 backbone against mmdet's ResNet-50 (all stages trained);
- ``r50-c3-c5``: mmdet's ResNet-50 with ACMix as the 3x3 conv of c3-c5 against ResNet-50;
- ``swin-t``: the Swin-ACMix-T backbone against mmdet's Swin-T;

each in ``--modes train`` (forward + backward) and ``infer`` (no-grad forward), on 2 threads by
default. The table gives time A / B (the ratio of medians, and for the backbones also the median
of the alternated pairs' ratios), memory A / B, and the project's target where it has one (train
mode, at the comparisons' own sizes).

``make bench`` runs it with the defaults (tens of minutes on a 2-core CPU). A quick look::

    python tools/benchmark_record.py --only layer-56 resnet50 --shape 256 384 --iters 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if TOOLS not in sys.path:  # the measuring tools beside this one
    sys.path.insert(0, TOOLS)

from benchmark_op import parse_shape, run_cases  # noqa: E402

from acmix_mm.utils.allocator import retain_freed_memory  # noqa: E402
from acmix_mm.utils.cli import non_negative_int, positive_int  # noqa: E402

MODES = ('train', 'infer')
DEFAULT_SHAPE = (800, 1344)  # the backbones' input, (H, W)
Shape = Tuple[int, int, int, int]


@dataclass(frozen=True)
class Comparison:
    """A (the ACMix side) against B (the baseline), with the targets of ``--mode train``.

    ``layer`` comparisons time one operator at ``shape`` (B, C, H, W); ``backbone`` ones time
    ``config``'s backbone against ``vs``'s with ``tools/benchmark.py`` at ``--shape``.
    """

    key: str
    title: str
    kind: str  # 'layer' | 'backbone'
    shape: Optional[Shape] = None
    config: str = ''
    vs: str = ''
    cfg_options: Tuple[str, ...] = ()
    time_target: Optional[float] = None
    memory_target: Optional[float] = None
    notes: Tuple[str, ...] = field(default=())


_STOCK_R50 = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
COMPARISONS: Tuple[Comparison, ...] = (
    Comparison('layer-56', 'ACMix(64, 64) layer vs 3x3 conv', 'layer',
               shape=(2, 64, 56, 56), time_target=2.5),
    Comparison('layer-200', 'ACMix(64, 64) layer vs 3x3 conv', 'layer',
               shape=(1, 64, 200, 336), time_target=2.5),
    Comparison('resnet50', 'ResNet-ACMix-50 vs ResNet-50, backbones', 'backbone',
               config='configs/acmix_resnet/mask-rcnn_acmix-r50_fpn_1x_coco.py', vs=_STOCK_R50,
               # both train every stage, as a from-scratch ResNet-ACMix-50 does
               cfg_options=('model.backbone.frozen_stages=-1', 'model.backbone.norm_eval=False'),
               time_target=1.4, memory_target=1.3),
    Comparison('r50-c3-c5', 'mmdet R50 + ACMix in c3-c5 vs R50, backbones', 'backbone',
               config='configs/acmix_layer/mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py',
               vs=_STOCK_R50, time_target=1.3),
    Comparison('swin-t', 'Swin-ACMix-T vs Swin-T, backbones', 'backbone',
               config='configs/acmix_swin/mask-rcnn_acmix-swin-t-p4-w7_fpn_1x_coco.py',
               vs='mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', time_target=1.1),
)
BY_KEY: Dict[str, Comparison] = {c.key: c for c in COMPARISONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='+', choices=list(BY_KEY), metavar='KEY',
                        help=f'comparisons to run, of {", ".join(BY_KEY)} (default: all)')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES),
                        help='train (forward + backward) and/or infer (no-grad forward); '
                             'default both')
    parser.add_argument('--shape', nargs=2, type=positive_int, default=DEFAULT_SHAPE,
                        metavar=('H', 'W'), help='backbone input size (default 800 1344)')
    parser.add_argument('--layer-shape', type=parse_shape, default=None, metavar='B,C,H,W',
                        help='run the layer comparisons at this shape instead of their own')
    parser.add_argument('--iters', type=positive_int, default=3,
                        help='timed iterations per side (median reported; default 3)')
    parser.add_argument('--warmup', type=non_negative_int, default=1,
                        help='untimed iterations per side first (default 1)')
    parser.add_argument('--threads', type=positive_int, default=2,
                        help='torch CPU threads (default 2, as the README\'s table)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--retain-freed-memory', action='store_true',
                        help='every comparison with glibc keeping freed memory '
                             '(acmix_mm.utils.allocator): no page faults for repeated large '
                             'tensors; backbone memory is then counted as live tensors')
    parser.add_argument('--json', metavar='FILE', default=None,
                        help='also write the record (settings and every row) to FILE as JSON')
    parser.add_argument('--child', metavar='KEY', choices=list(BY_KEY), help=argparse.SUPPRESS)
    parser.add_argument('--child-mode', choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument('--child-result', help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------ one comparison
def measure_layer(comparison: Comparison, args: argparse.Namespace, mode: str) -> dict:
    torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        retain_freed_memory()
    shape = args.layer_shape or comparison.shape
    measured = run_cases(['auto', 'conv3x3'], shape, torch.device(args.device), 1, args.iters,
                         args.warmup, 'allocator', mode)
    (time_a, mem_a), (time_b, mem_b) = measured['auto'], measured['conv3x3']
    return dict(input=','.join(map(str, shape)), time_a_ms=time_a * 1e3,
                time_b_ms=time_b * 1e3, memory_a_mb=mem_a / 2**20, memory_b_mb=mem_b / 2**20,
                pair_median=None, memory='live tensors (allocator)')


def measure_backbones(comparison: Comparison, args: argparse.Namespace, mode: str) -> dict:
    import benchmark  # builds models through mmengine: imported where it is used

    argv = [os.path.join(REPO, comparison.config), '--vs', comparison.vs, '--part', 'backbone',
            '--mode', mode, '--shape', *map(str, args.shape), '--iters', str(args.iters),
            '--warmup', str(args.warmup), '--threads', str(args.threads),
            '--device', args.device]
    if args.retain_freed_memory:
        argv.append('--retain-freed-memory')
    if comparison.cfg_options:
        argv += ['--cfg-options', *comparison.cfg_options]
    parser = benchmark.build_parser()
    a, b = benchmark.measure(parser, parser.parse_args(argv))
    pairs = [ta / tb for ta, tb in zip(a.times, b.times) if tb > 0]
    return dict(input='x'.join(map(str, args.shape)), time_a_ms=a.time_ms, time_b_ms=b.time_ms,
                memory_a_mb=a.peak_mb, memory_b_mb=b.peak_mb,
                pair_median=statistics.median(pairs) if pairs else None,
                memory=a.memory_method)


def run_child(args: argparse.Namespace) -> int:
    comparison = BY_KEY[args.child]
    measure = measure_layer if comparison.kind == 'layer' else measure_backbones
    result = measure(comparison, args, args.child_mode)
    with open(args.child_result, 'w') as f:
        json.dump(result, f)
    return 0


def _child_command(args: argparse.Namespace, key: str, mode: str, result: str) -> List[str]:
    command = [sys.executable, os.path.abspath(__file__), '--child', key, '--child-mode', mode,
               '--child-result', result, '--shape', *map(str, args.shape),
               '--iters', str(args.iters), '--warmup', str(args.warmup),
               '--threads', str(args.threads), '--device', args.device]
    if args.layer_shape:
        command += ['--layer-shape', ','.join(map(str, args.layer_shape))]
    if args.retain_freed_memory:
        command.append('--retain-freed-memory')
    return command


def run_comparison(args: argparse.Namespace, key: str, mode: str) -> dict:
    """One comparison in one mode, in a fresh process; its measurements as a dict."""
    with tempfile.TemporaryDirectory(prefix='acmix_bench_') as tmp:
        result = os.path.join(tmp, 'result.json')
        done = subprocess.run(_child_command(args, key, mode, result), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not os.path.exists(result):
            raise RuntimeError(f'comparison {key} ({mode}) failed with exit code '
                               f'{done.returncode}:\n{done.stdout[-4000:]}')
        with open(result) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------ the table
def _verdict(value: float, target: Optional[float], kind: str) -> str:
    if target is None:
        return ''
    return f'{kind} <= {target:g}: {"met" if value <= target else "not met"}'


def make_row(comparison: Comparison, mode: str, measured: dict, own_size: bool = True) -> dict:
    """The measurements plus the ratios and the targets' verdicts (train mode only, and only
    at the comparison's own size: ``own_size``)."""
    time_ratio = measured['time_a_ms'] / measured['time_b_ms']
    memory_ratio = (measured['memory_a_mb'] / measured['memory_b_mb']
                    if measured['memory_b_mb'] > 0 else None)
    verdicts = []
    if mode == 'train' and own_size:
        verdicts.append(_verdict(time_ratio, comparison.time_target, 'time'))
        if memory_ratio is not None:
            verdicts.append(_verdict(memory_ratio, comparison.memory_target, 'memory'))
    return dict(measured, key=comparison.key, title=comparison.title, mode=mode,
                time_ratio=time_ratio, memory_ratio=memory_ratio,
                target=', '.join(v for v in verdicts if v))


def format_table(rows: Sequence[dict]) -> str:
    lines = ['| comparison (A vs B) | mode | input | A (ms) | B (ms) | time A / B '
             '| per-pair median | memory A / B | target |',
             '|---|---|---|---:|---:|---:|---:|---:|---|']
    for r in rows:
        pair = f'{r["pair_median"]:.2f}' if r['pair_median'] is not None else '-'
        memory = f'{r["memory_ratio"]:.2f}' if r['memory_ratio'] is not None else 'n/a'
        lines.append(f'| {r["title"]} | {r["mode"]} | {r["input"]} | {r["time_a_ms"]:.1f} | '
                     f'{r["time_b_ms"]:.1f} | **{r["time_ratio"]:.2f}** | {pair} | {memory} | '
                     f'{r["target"]} |')
    return '\n'.join(lines)


def _check_output(parser: argparse.ArgumentParser, path: Optional[str]) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f'--json {path!r} is a directory; give a file path')
    if not os.path.isdir(folder):
        parser.error(f'--json {path!r}: the folder {folder!r} does not exist')


def _write_json(path: str, record: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.benchmark_record_', suffix='.json', dir=folder)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: Optional[List[str]] = None) -> List[dict]:
    """Run the comparisons; prints the table and returns its rows (dicts, as in ``--json``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return []
    _check_output(parser, args.json)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was requested but CUDA is not available '
                     f'(torch {torch.__version__}, cuda build: {torch.version.cuda})')

    keys = list(dict.fromkeys(args.only or BY_KEY))
    modes = list(dict.fromkeys(args.modes))
    rows = []
    for key in keys:
        for mode in modes:
            comparison = BY_KEY[key]
            own_size = (args.layer_shape in (None, comparison.shape) if comparison.kind == 'layer'
                        else tuple(args.shape) == DEFAULT_SHAPE)
            rows.append(make_row(comparison, mode, run_comparison(args, key, mode), own_size))
            print(f'# {key} {mode}: time A / B {rows[-1]["time_ratio"]:.2f}', file=sys.stderr,
                  flush=True)
    settings = dict(device=args.device, threads=args.threads, iters=args.iters,
                    warmup=args.warmup, torch=torch.__version__, batch=1,
                    retain_freed_memory=args.retain_freed_memory)
    backbone_memory = ('live tensors' if args.retain_freed_memory and args.device == 'cpu'
                       else 'peak RSS growth')
    print(f'device {args.device}, {args.threads} threads, batch 1, median of {args.iters} after '
          f'{args.warmup} warm-up, torch {torch.__version__}; each row in its own process, A and '
          f'B alternating{"; freed memory retained" if args.retain_freed_memory else ""}; memory: '
          f'live tensors for the layers, {backbone_memory} for the backbones '
          '(CUDA: max_memory_allocated)\n')
    print(format_table(rows))
    if args.json:
        _write_json(args.json, dict(settings=settings, rows=rows))
    return rows


if __name__ == '__main__':
    main()
    sys.exit(0)
