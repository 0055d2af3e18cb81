#!/usr/bin/env python
"""Time a training iteration of one config through the Lightning wrapper and through mmengine's Runner.

    python tools/benchmark_trainer.py CONFIG [--iters 30] [--warmup 5] [--rounds 2] \
        [--threads N] [--cfg-options KEY=VALUE ...]

Both trainers run the same config in separate processes that alternate (runner, lightning,
lightning, runner, ...: a change of load on a shared machine hits both): the same model, seed,
train dataloader, optimiser wrapper (gradient clipping included), and the loggers each one
builds by default (mmengine's ``LoggerHook``; the wrapper's CSV and TensorBoard loggers). For
the comparison the config is changed alike for both: an ``IterBasedTrainLoop`` of
``warmup + iters`` iterations, no validation or test, no parameter schedulers (mmengine and
Lightning count epoch-based ones differently), and no checkpoints within the run.

An iteration is the time from the end of one training step to the end of the next, taken after
every other hook or callback ran (mmengine: a ``LOWEST``-priority ``after_train_iter`` hook;
Lightning: the last ``on_train_batch_end`` callback), so it holds everything each trainer does
per step: fetching the batch, the data preprocessor, forward, backward, the optimiser step and
the per-step logging. The first ``warmup`` iterations are dropped.

Prints a markdown table: per round and overall, the median iteration of each trainer and the
ratio lightning / runner (the wrapper's overhead is the ratio minus 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from acmix_mm.utils.cli import positive_int, non_negative_int

TRAINERS = ('runner', 'lightning')
NO_CHECKPOINT_STEPS = 10 ** 9


def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='mmengine config (a path or pkg::path)')
    parser.add_argument('--iters', type=positive_int, default=30, help='timed iterations (30)')
    parser.add_argument('--warmup', type=non_negative_int, default=5,
                        help='iterations before the timed ones (5)')
    parser.add_argument('--rounds', type=positive_int, default=2,
                        help='process pairs; the order alternates per round (2)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help="torch CPU threads in each process (default: torch's choice)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        metavar='KEY=VALUE', help='config overrides, applied for both trainers')
    parser.add_argument('--child', choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    parser.add_argument('--work-dir', help=argparse.SUPPRESS)
    return parser


def comparable_config(config: str, cfg_options: Optional[dict], total_iters: int):
    """The config both trainers run: ``total_iters`` iterations of training only."""
    from mmengine.config import ConfigDict

    from acmix_mm.lightning import load_config

    cfg = load_config(config, cfg_options)
    cfg.train_cfg = ConfigDict(type='IterBasedTrainLoop', max_iters=total_iters,
                               val_interval=NO_CHECKPOINT_STEPS)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg',
                'test_evaluator', 'param_scheduler', 'load_from'):
        cfg[key] = None
    cfg.resume = False
    hooks = ConfigDict(cfg.get('default_hooks') or {})
    hooks.checkpoint = ConfigDict(type='CheckpointHook', interval=NO_CHECKPOINT_STEPS,
                                  by_epoch=False, save_last=False)
    cfg.default_hooks = hooks
    return cfg


def _run_runner(cfg, work_dir: str, stamps: List[float]) -> None:
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class StampAfterIteration(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            stamps.append(time.perf_counter())

    cfg.work_dir = work_dir
    cfg.launcher = 'none'
    runner = Runner.from_cfg(cfg)
    runner.register_hook(StampAfterIteration(), priority='LOWEST')
    runner.train()


def _run_lightning(cfg, work_dir: str, stamps: List[float]) -> None:
    from lightning.pytorch.callbacks import Callback

    from acmix_mm.lightning import train

    class StampAfterIteration(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())

    # Lightning runs the Trainer's callbacks in order and the module's own after them; the
    # stamp goes last by being appended after the module's (see MMLightningModule).
    train(cfg, work_dir=work_dir, callbacks=[StampAfterIteration()],
          enable_progress_bar=False)


def run_child(args: argparse.Namespace) -> int:
    import torch

    import acmix_mm  # noqa: F401  (registers the ACMix models)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = comparable_config(args.config, args.cfg_options, args.warmup + args.iters)
    stamps: List[float] = []
    (_run_runner if args.child == 'runner' else _run_lightning)(cfg, args.work_dir, stamps)
    if len(stamps) != args.warmup + args.iters:
        raise RuntimeError(f'{args.child}: {len(stamps)} iterations recorded, expected '
                           f'{args.warmup + args.iters}')
    intervals = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    with open(args.result, 'w') as f:
        json.dump(dict(trainer=args.child, intervals=intervals,
                       threads=torch.get_num_threads()), f)
    return 0


def _child_command(args: argparse.Namespace, trainer: str, result: str, work_dir: str) -> List[str]:
    command = [sys.executable, os.path.abspath(__file__), args.config, '--child', trainer,
               '--result', result, '--work-dir', work_dir, '--iters', str(args.iters),
               '--warmup', str(args.warmup)]
    if args.threads is not None:
        command += ['--threads', str(args.threads)]
    if args.cfg_options:
        command += ['--cfg-options'] + [f'{k}={_option_text(v)}' for k, v in args.cfg_options.items()]
    return command


def _option_text(value) -> str:
    """A --cfg-options value as DictAction parses it back (lists and tuples without spaces)."""
    if isinstance(value, (list, tuple)):
        inner = ','.join(_option_text(v) for v in value)
        return f'[{inner}]' if isinstance(value, list) else f'({inner})'
    return str(value)


def format_table(rounds: Sequence[Dict[str, List[float]]]) -> str:
    lines = ['| round | runner, median iteration (ms) | lightning, median iteration (ms) | '
             'lightning / runner |', '|---|---:|---:|---:|']
    for i, times in enumerate(rounds, 1):
        r, l_ = statistics.median(times['runner']), statistics.median(times['lightning'])
        lines.append(f'| {i} | {r * 1e3:.1f} | {l_ * 1e3:.1f} | {l_ / r:.3f} |')
    every = {t: [x for times in rounds for x in times[t]] for t in TRAINERS}
    r, l_ = statistics.median(every['runner']), statistics.median(every['lightning'])
    lines.append(f'| all | {r * 1e3:.1f} | {l_ * 1e3:.1f} | **{l_ / r:.3f}** |')
    return '\n'.join(lines) + f'\n\nwrapper overhead: {100 * (l_ / r - 1):+.1f} %'


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)
    if args.iters < 2:
        parser.error(f'--iters must be at least 2 (intervals between iterations), got {args.iters}')
    # Parse once here: a bad config or option fails before any process starts.
    comparable_config(args.config, args.cfg_options, args.warmup + args.iters)
    rounds = []
    with tempfile.TemporaryDirectory(prefix='acmix_benchmark_trainer_') as tmp:
        for index in range(args.rounds):
            order = TRAINERS if index % 2 == 0 else TRAINERS[::-1]
            times: Dict[str, List[float]] = {}
            for trainer in order:
                result = os.path.join(tmp, f'{index}-{trainer}.json')
                work_dir = os.path.join(tmp, f'{index}-{trainer}')
                done = subprocess.run(_child_command(args, trainer, result, work_dir),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-4000:])
                    print(f'benchmark_trainer: the {trainer} process failed (exit '
                          f'{done.returncode}); its last output is above', file=sys.stderr)
                    return 1
                with open(result) as f:
                    times[trainer] = json.load(f)['intervals']
                print(f'# round {index + 1} {trainer}: median '
                      f'{statistics.median(times[trainer]) * 1e3:.1f} ms', file=sys.stderr,
                      flush=True)
            rounds.append(times)
    print(f'{args.config}: {args.iters} iterations after {args.warmup} warm-up, per process\n')
    print(format_table(rounds))
    return 0


if __name__ == '__main__':
    sys.exit(main())
