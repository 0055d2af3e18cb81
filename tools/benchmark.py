#!/usr/bin/env python
"""Benchmark an mmdet/mmseg config's model or backbone: median iteration time and peak memory.

    .venv/bin/python tools/benchmark.py CONFIG [--vs CONFIG] [--mode train|infer]
        [--part backbone|model] [--shape H W] [--batch N] [--iters N] [--warmup N]
        [--device cpu|cuda] [--data random|dataset] [--threads N] [--channels-last]
        [--attn-impl auto|lean|unfold|...] [--conv-impl auto|conv|cpp] [--cfg-options KEY=VALUE ...]

CONFIG is a path (``configs/acmix_resnet/...py``) or an installed package's config,
``mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py`` / ``mmseg::...``. The model is built as the
config describes it, with two changes: every ``init_cfg`` of type ``Pretrained`` (and mmseg's
``model.pretrained``) is dropped, since weights do not change the cost and may not be on disk,
and SyncBN is reverted to BN (no process group here).

What one iteration is:

- ``--mode train``: ``model.train()`` (frozen stages and ``norm_eval`` stay as in training),
  forward + backward. Whole model (``--part model``): ``loss`` mode on a batch with targets,
  the summed losses backward. Backbone alone: the sum of its outputs' means backward.
  Gradients are set to None before every iteration (as ``optimizer.zero_grad()`` does), so
  their allocation is part of the measured peak.
- ``--mode infer``: ``model.eval()``, a forward under ``torch.no_grad()`` (whole model:
  ``predict`` mode, post-processing included).

The batch goes through the config's data preprocessor before the clock starts (its cost is
not measured). ``--data random``: uint8 images of ``--shape`` (default: 800x1344 for mmdet,
the crop size for mmseg) with, for detectors, three random valid boxes per image (and box
masks where the model has a mask head) and, for segmentors, a random label map.
``--data dataset``: the first ``--batch`` images of the config's train dataset through its
train pipeline, resized to ``--shape`` when given.

Reported: the median time of ``--iters`` iterations after ``--warmup`` untimed ones, and the
peak memory of one iteration above the level just before it (the maximum over the timed
iterations): CUDA ``torch.cuda.max_memory_allocated`` (reset per iteration); CPU the process's
peak RSS growth (``acmix_mm.utils.PeakMemory(method='rss')``: ``VmHWM`` reset through
``/proc/self/clear_refs``); with ``--retain-freed-memory`` (glibc keeps freed memory, see
:mod:`acmix_mm.utils.allocator`, so RSS no longer grows per iteration) the live tensor bytes of
one more iteration per model, through torch's profiler. With ``--vs`` both models are built in this process and run
alternately, A, B, A, B, ..., so that load changes on a shared machine hit both alike, and the
table adds the ratios A / B.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from acmix_mm.tool_batches import dataset_batch, random_batch
from acmix_mm.tool_models import build_tool_model, config_scope, default_input_shape, load_tool_config
from acmix_mm.utils.allocator import retain_freed_memory
from acmix_mm.utils.cli import non_negative_int, positive_int

MIB = 2 ** 20


# ------------------------------------------------------------------------------- arguments
def attn_impl_choices() -> Tuple[str, ...]:
    """'auto' plus whatever attention paths the installed operator offers."""
    from acmix_mm.ops.local_attention import ATTN_IMPLS
    return ('auto',) + tuple(i for i in ATTN_IMPLS if i != 'auto')


def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config path, or mmdet::PATH / mmseg::PATH of an installed '
                                       'package\'s config')
    parser.add_argument('--vs', metavar='CONFIG', help='a second config, run alternately with '
                                                       'the first; prints the ratios first / second')
    parser.add_argument('--mode', choices=('train', 'infer'), default='train',
                        help='train: forward + backward (default); infer: no-grad forward')
    parser.add_argument('--part', choices=('backbone', 'model'), default='model',
                        help='the whole model (default) or its backbone alone')
    parser.add_argument('--shape', type=positive_int, nargs=2, metavar=('H', 'W'),
                        help='image size (default: 800 1344 for mmdet, the crop size for mmseg; '
                             'with --data dataset: the pipeline\'s own size)')
    parser.add_argument('--batch', type=positive_int, default=1, help='images per iteration (1)')
    parser.add_argument('--iters', type=positive_int, default=3,
                        help='timed iterations per model (default 3; the median is reported)')
    parser.add_argument('--warmup', type=non_negative_int, default=1,
                        help='untimed iterations per model first (default 1)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--data', choices=('random', 'dataset'), default='random',
                        help='random images and targets (default) or the train dataset\'s first '
                             'images through its pipeline')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--channels-last', action='store_true',
                        help='convert the model\'s 4-D weights and the input to channels_last')
    parser.add_argument('--attn-impl', choices=attn_impl_choices(), default=None,
                        help='set attn_impl of every ACMix layer (default: as the config builds '
                             'it)')
    parser.add_argument('--conv-impl', choices=('auto', 'conv', 'cpp'), default=None,
                        help="set conv_impl (the convolution branch's kernel) of every ACMix layer "
                             "(default: as the config builds it, normally 'auto')")
    parser.add_argument('--retain-freed-memory', action='store_true',
                        help='glibc keeps freed memory in the process (no page faults for the '
                             'next iteration\'s large tensors; acmix_mm.utils.allocator); peak '
                             'memory is then the live tensor bytes of one extra iteration')
    parser.add_argument('--profile', type=non_negative_int, default=0, metavar='N',
                        help='after timing, profile one more iteration of each model with '
                             'torch.profiler and print its N most expensive ops (self time)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the weights and data (0)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override settings of both configs, as in mmdet/mmseg tools')
    return parser


# ------------------------------------------------------------------------------- configs
def load_config(name: str, cfg_options: Optional[dict] = None):
    """The mmengine Config of ``name`` (path or ``mmdet::``/``mmseg::``), checked to be an
    mmdet/mmseg model config."""
    cfg = load_tool_config(name, cfg_options)
    config_scope(cfg, f'the benchmark (config {name!r})')
    return cfg


# ------------------------------------------------------------------------------- building
@dataclass
class Subject:
    """One benchmarked model: what runs, on which data, and its measurements."""

    label: str
    name: str
    cfg: Any
    module: nn.Module  # the whole model or its backbone
    preprocessor: nn.Module
    batch: dict
    notes: List[str] = field(default_factory=list)
    times: List[float] = field(default_factory=list)  # seconds per timed iteration
    peaks: List[int] = field(default_factory=list)  # bytes per timed iteration
    memory_method: str = ''
    input_shape: Tuple[int, ...] = ()

    @property
    def time_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def peak_mb(self) -> float:
        return max(self.peaks) / MIB


def set_attn_impl(module: nn.Module, impl: str) -> int:
    """Set ``attn_impl`` of every :class:`acmix_mm.ops.ACMix` inside ``module``; returns how many.

    ``'auto'`` is resolved the way a freshly built ACMix resolves it.
    """
    from acmix_mm.ops import ACMix

    return _set_on_acmix(module, 'attn_impl', ACMix(4, 4, head=1, attn_impl=impl).attn_impl)


def set_conv_impl(module: nn.Module, impl: str) -> int:
    """Set ``conv_impl`` of every :class:`acmix_mm.ops.ACMix` inside ``module``; returns how many."""
    return _set_on_acmix(module, 'conv_impl', impl)


def _set_on_acmix(module: nn.Module, attribute: str, value: str) -> int:
    from acmix_mm.ops import ACMix

    layers = [m for m in module.modules() if isinstance(m, ACMix)]
    for m in layers:
        setattr(m, attribute, value)
    return len(layers)


def attn_impls_in(module: nn.Module) -> Dict[str, int]:
    """How many ACMix layers of ``module`` use each ``attn_impl``."""
    from acmix_mm.ops import ACMix

    counts: Dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, ACMix):
            counts[str(m.attn_impl)] = counts.get(str(m.attn_impl), 0) + 1
    return counts


def resolved_auto(device: torch.device) -> str:
    """The kernel ``attn_impl='auto'`` picks for float32 activations on ``device``."""
    from acmix_mm.ops.local_attention import resolve_attn_impl

    return resolve_attn_impl('auto', torch.empty(0, device=device))


def build_subject(label: str, name: str, args: argparse.Namespace,
                  device: torch.device) -> Subject:
    """Build the model (or backbone) of config ``name`` and its batch, on ``device``."""
    cfg = load_config(name, args.cfg_options)
    shape = tuple(args.shape) if args.shape else None
    pad_to = (shape or default_input_shape(cfg)) if shape is not None or args.data == 'random' else None
    built = build_tool_model(cfg, args.seed, what='the benchmark', preprocessor_size=pad_to)
    model, scope = built.model, built.scope
    notes = [f'{built.dropped_pretrained} Pretrained init dropped'] if built.dropped_pretrained else []
    _quiet_init_weights(model)
    preprocessor = model.data_preprocessor
    gen = torch.Generator().manual_seed(args.seed)
    if args.data == 'random':
        batch = random_batch(scope, model, shape or default_input_shape(cfg), args.batch, gen)
    else:
        batch = dataset_batch(cfg, shape, args.batch)
    # With --part backbone the rest of the model is dropped with `model` when this returns.
    module = model.backbone if args.part == 'backbone' else model
    if args.attn_impl is not None:
        count = set_attn_impl(module, args.attn_impl)
        notes.append(f'attn_impl={args.attn_impl} on {count} ACMix layers' if count
                     else 'no ACMix layers')
    else:
        impls = attn_impls_in(module)
        if impls:  # what the config built
            notes.append('ACMix attn_impl ' + ', '.join(f'{k} x{v}' for k, v in impls.items()))
    if 'auto' in attn_impls_in(module):
        notes.append(f"auto = {resolved_auto(device)} here")
    if args.conv_impl is not None:
        count = set_conv_impl(module, args.conv_impl)
        notes.append(f'conv_impl={args.conv_impl} on {count} ACMix layers' if count
                     else 'no ACMix layers')
    module.to(device)
    preprocessor.to(device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    return Subject(label=label, name=name, cfg=cfg, module=module, preprocessor=preprocessor,
                   batch=batch, notes=notes)


def _quiet_init_weights(model: nn.Module) -> None:
    """``model.init_weights()`` without mmengine's per-parameter INFO log (thousands of lines)."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------- running
def make_step(subject: Subject, args: argparse.Namespace, device: torch.device
              ) -> Tuple[Callable[[], Any], Callable[[], None]]:
    """(prepare, step): prepare runs untimed before each iteration, step is what is measured."""
    module, training = subject.module, args.mode == 'train'
    module.train(training)
    state: Dict[str, Any] = {}
    params = [p for p in module.parameters() if p.requires_grad]

    def prepare() -> None:
        for p in params:
            p.grad = None  # as optimizer.zero_grad(): gradients are allocated every iteration
        data = subject.preprocessor(copy.deepcopy(subject.batch), training)
        if args.channels_last:
            data['inputs'] = data['inputs'].contiguous(memory_format=torch.channels_last)
        state['data'] = data
        subject.input_shape = tuple(data['inputs'].shape)

    def step() -> None:
        data = state['data']
        if args.part == 'backbone':
            if training:
                outs = module(data['inputs'])
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                grads = [o for o in outs if o.requires_grad]
                if not grads:
                    raise RuntimeError(f'{subject.name}: no backbone output requires grad (every '
                                       'stage frozen?); use --mode infer')
                sum(o.float().mean() for o in grads).backward()
            else:
                with torch.no_grad():
                    module(data['inputs'])
        elif training:
            losses = module(**data, mode='loss')
            total, _ = module.parse_losses(losses)
            total.backward()
        else:
            with torch.no_grad():
                module(**data, mode='predict')

    return prepare, step


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run(subjects: Sequence[Subject], args: argparse.Namespace, device: torch.device) -> None:
    """Alternate the subjects' iterations (A, B, A, B, ...), warm-up first; fill times/peaks."""
    from mmengine.registry import DefaultScope

    from acmix_mm.utils import PeakMemory

    # Freed memory kept in the process: RSS stops growing per iteration, so memory is counted
    # as live tensors, in an iteration of its own (the profiler would slow the timed ones).
    separate_memory = device.type == 'cpu' and getattr(args, 'retain_freed_memory', False)
    method = 'rss' if device.type == 'cpu' else 'allocator'
    steps = [make_step(s, args, device) for s in subjects]
    for it in range(args.warmup + args.iters):
        for subject, (prepare, step) in zip(subjects, steps):
            prepare()
            meter = (contextlib.nullcontext(PeakMemory(device)) if separate_memory
                     else PeakMemory(device, method))
            with DefaultScope.overwrite_default_scope(subject.cfg.default_scope), meter as mem:
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                seconds = time.perf_counter() - start
            if it >= args.warmup:
                subject.times.append(seconds)
                subject.peaks.append(int(mem.peak_bytes or 0))
                subject.memory_method = mem.method or ''
            print(f'# {subject.label} {"warm-up" if it < args.warmup else "iter"} '
                  f'{it + 1 - (args.warmup if it >= args.warmup else 0)}: {seconds * 1e3:.1f} ms, '
                  f'{(mem.peak_bytes or 0) / MIB:.1f} MB', file=sys.stderr, flush=True)
    if separate_memory:
        for subject, (prepare, step) in zip(subjects, steps):
            prepare()
            with DefaultScope.overwrite_default_scope(subject.cfg.default_scope), \
                    PeakMemory(device, 'allocator') as mem:
                step()
            subject.peaks = [int(mem.peak_bytes or 0)]
            subject.memory_method = mem.method or ''


def profile(subjects: Sequence[Subject], args: argparse.Namespace, device: torch.device,
            top: int) -> str:
    """One more iteration of each subject under torch.profiler: its ``top`` ops by self time."""
    from mmengine.registry import DefaultScope

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    tables = []
    for subject in subjects:
        prepare, step = make_step(subject, args, device)
        prepare()
        with DefaultScope.overwrite_default_scope(subject.cfg.default_scope), \
                torch.profiler.profile(activities=activities) as prof:
            step()
            _sync(device)
        tables.append(f'profile of {subject.label} ({subject.name}), one iteration:\n'
                      + prof.key_averages().table(sort_by=sort_by, row_limit=top))
    return '\n'.join(tables)


def _module_type(subject: Subject) -> str:
    if isinstance(subject.module, nn.Module):
        backbone = getattr(subject.module, 'backbone', subject.module)
        return type(backbone).__name__
    return '?'


def format_report(subjects: Sequence[Subject], args: argparse.Namespace,
                  shape_text: str) -> str:
    what = 'forward + backward' if args.mode == 'train' else 'no-grad forward'
    memory = ('peak RSS growth (VmHWM)' if subjects[0].memory_method == 'vmhwm'
              else 'peak RSS growth (sampled)' if subjects[0].memory_method == 'rss_sampling'
              else 'live tensors (allocator)' if subjects[0].memory_method == 'cpu_allocator'
              else 'CUDA max_memory_allocated')
    if getattr(args, 'retain_freed_memory', False):
        memory += ', freed memory retained'
    lines = [
        f'mode {args.mode} ({what}), part {args.part}, data {args.data}, input {shape_text}, '
        f'device {args.device}, {torch.get_num_threads()} threads'
        f'{", channels_last" if args.channels_last else ""}, median of {args.iters} after '
        f'{args.warmup} warm-up, memory: {memory}, torch {torch.__version__}',
        '',
        '| | config | backbone | time (ms) | peak memory (MB) | notes |',
        '|---|---|---|---:|---:|---|',
    ]
    for s in subjects:
        lines.append(f'| {s.label} | {s.name} | {_module_type(s)} | {s.time_ms:.1f} | '
                     f'{s.peak_mb:.1f} | {"; ".join(s.notes)} |')
    if len(subjects) == 2:
        a, b = subjects

        def ratio(x: float, y: float) -> str:
            return f'{x / y:.3f}' if y > 0 else 'n/a'

        lines.append(f'| A / B | | | {ratio(a.time_ms, b.time_ms)} | '
                     f'{ratio(a.peak_mb, b.peak_mb)} | |')
        # Each A iteration ran next to a B one: their ratios cancel slow load changes that the
        # ratio of medians above can still see.
        pairs = [ta / tb for ta, tb in zip(a.times, b.times) if tb > 0]
        if pairs:
            lines += ['', f'time A / B per alternated pair: '
                          f'{", ".join(f"{r:.3f}" for r in pairs)} '
                          f'(median {statistics.median(pairs):.3f})']
    return '\n'.join(lines)


def measure(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[Subject]:
    """Build and time the config (and ``--vs``) that ``args`` names; prints their report.

    Bad arguments end through ``parser.error`` before any model is built.
    """
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was requested but CUDA is not available '
                     f'(torch {torch.__version__}, cuda build: {torch.version.cuda})')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not retain_freed_memory():
        parser.error('--retain-freed-memory needs glibc (Linux); this C library is '
                     f'{platform.libc_ver()[0] or platform.system()}')
    import acmix_mm  # noqa: F401  registers the ACMix backbones into mmdet/mmseg

    device = torch.device(args.device)
    names = [args.config] + ([args.vs] if args.vs else [])
    scopes = [load_config(n, args.cfg_options).default_scope for n in names]
    if args.part == 'model' and len(set(scopes)) > 1:
        parser.error(f'--part model compares whole models of one kind; {names[0]} is {scopes[0]} '
                     f'and {names[1]} is {scopes[1]} (use --part backbone)')
    subjects = [build_subject(label, name, args, device)
                for label, name in zip('AB', names)]
    run(subjects, args, device)
    shape_text = ' / '.join(dict.fromkeys('x'.join(map(str, s.input_shape)) for s in subjects))
    print(format_report(subjects, args, shape_text))
    if args.profile:
        print()
        print(profile(subjects, args, device, args.profile))
    for s in subjects:
        if not (math.isfinite(s.time_ms) and s.time_ms > 0):
            raise RuntimeError(f'{s.name}: measured a non-positive time {s.time_ms}')
    return subjects


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    """Run the benchmark; returns ``{label: {'time_ms', 'peak_mb'}}`` (also printed as a table)."""
    parser = build_parser()
    subjects = measure(parser, parser.parse_args(argv))
    return {s.label: dict(time_ms=s.time_ms, peak_mb=s.peak_mb) for s in subjects}


if __name__ == '__main__':
    main()
    sys.exit(0)
