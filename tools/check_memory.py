#!/usr/bin/env python
"""Run a config's validation many times in one process and print the memory after each epoch.

    python tools/check_memory.py CONFIG [--epochs 10] [--mode validate|fit] [--checkpoint CKPT]
                                 [--val-batches N] [--max-growth-mb MB] [--cfg-options k=v ...]

``--mode validate`` (default) calls ``trainer.validate`` ``--epochs`` times on one Trainer, one
``MMLightningModule`` and one ``MMDataModule`` (so one evaluator: the same ``CocoMetric`` /
``IoUMetric`` object scores every epoch, as in a long training run). ``--mode fit`` instead trains
``--epochs`` epochs of one batch each with a validation after every epoch (checkpoints and
loggers off), which adds the training loop and the optimiser.

After every validation the Python garbage is collected and glibc's free heap pages are returned
to the OS (``malloc_trim(0)``), then the process's resident set (RSS) is read, with the number of
objects tracked by Python's garbage collector and the number of results each metric still holds
(mmengine's ``BaseMetric.evaluate`` clears them; a metric that did not would grow every epoch).
The summary reports the growth from the end of epoch 2 to the end of the last epoch (the first
epochs allocate caches, the optimiser state, the COCO index, ...). With ``--max-growth-mb`` the
exit status is 1 when the growth exceeds it.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from lightning.pytorch import Callback, Trainer
from mmengine.config import DictAction

import acmix_mm  # noqa: F401  (registers the ACMix models)
from acmix_mm.lightning import MMDataModule, MMLightningModule, load_config
from acmix_mm.checkpoint import atomic_write_text, load_model_weights
from acmix_mm.utils.memory import settled_rss_bytes

MODES = ('validate', 'fit')
MB = 1024 * 1024
#: The epoch after which growth is counted (1-based): epochs 1-2 fill caches.
BASELINE_EPOCH = 2


@dataclasses.dataclass
class EpochMemory:
    """Memory after one validation epoch.

    Attributes:
        epoch: 1-based validation epoch.
        rss_mb: resident set size in MiB, after gc.collect() and malloc_trim(0).
        gc_objects: objects tracked by Python's garbage collector.
        pending_results: results still held by the evaluator's metrics (0 when they reset).
        evaluator_id: ``id()`` of the evaluator that scored the epoch (the same one every epoch).
        metrics: the epoch's scalar metrics.
    """

    epoch: int
    rss_mb: float
    gc_objects: int
    pending_results: int
    evaluator_id: int
    metrics: Dict[str, float]


def _pending_results(module: MMLightningModule) -> int:
    evaluator = module.evaluator('val')
    return sum(len(metric.results) for metric in evaluator.metrics)


class _Recorder(Callback):
    """Records an :class:`EpochMemory` at the end of every (non-sanity) validation."""

    def __init__(self) -> None:
        self.epochs: List[EpochMemory] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in pl_module.metrics.get('val', {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rss = settled_rss_bytes()
        self.epochs.append(EpochMemory(len(self.epochs) + 1, rss / MB, len(gc.get_objects()),
                                       _pending_results(pl_module), id(pl_module.evaluator('val')), metrics))


def check_memory(cfg: Any, epochs: int = 10, mode: str = 'validate', checkpoint: Optional[str] = None,
                 val_batches: Optional[int] = None, echo: bool = True) -> List[EpochMemory]:
    """Run ``epochs`` validation epochs of ``cfg`` in this process; memory after each.

    Args:
        cfg: an mmengine config (object, dict or path) with ``model``, ``val_dataloader`` and
            ``val_evaluator`` (``--mode fit`` also ``train_dataloader`` and ``optim_wrapper``).
        epochs: number of validation epochs, >= ``BASELINE_EPOCH + 1``.
        mode: ``'validate'`` (repeated ``trainer.validate``) or ``'fit'`` (one training batch and
            one validation per epoch).
        checkpoint: weights to evaluate (default: the config's initialisation).
        val_batches: validate on the first N batches only (default: all).
        echo: print one line per epoch as it ends.

    Returns:
        One :class:`EpochMemory` per epoch.

    Raises:
        ValueError: a bad ``epochs``, ``mode`` or ``val_batches``, or a config without validation.
    """
    if not isinstance(epochs, int) or epochs <= BASELINE_EPOCH:
        raise ValueError(f'epochs must be an int > {BASELINE_EPOCH} (growth is counted after epoch '
                         f'{BASELINE_EPOCH}), got {epochs!r}')
    if mode not in MODES:
        raise ValueError(f'mode={mode!r}; allowed: {", ".join(MODES)}')
    if val_batches is not None and (not isinstance(val_batches, int) or val_batches < 1):
        raise ValueError(f'val_batches must be an int >= 1 or None, got {val_batches!r}')
    cfg = load_config(cfg) if isinstance(cfg, (str, os.PathLike)) else cfg
    for key in ('val_dataloader', 'val_evaluator'):
        if not cfg.get(key):
            raise ValueError(f'the config has no {key}: check_memory runs validation')
    if mode == 'fit':
        # Epoch-based, validating after every epoch; the Trainer limits each epoch to one batch.
        cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=epochs, val_interval=1)
    datamodule = MMDataModule(cfg)
    datamodule.check('fit' if mode == 'fit' else 'validate')
    module = MMLightningModule(cfg, init_weights=checkpoint is None)
    if checkpoint is not None:
        load_model_weights(module.model, checkpoint)
    recorder = _Recorder()
    printer = _Printer() if echo else None
    callbacks = [recorder] + ([printer] if printer else [])
    trainer = Trainer(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      use_distributed_sampler=False, callbacks=callbacks,
                      limit_val_batches=val_batches if val_batches is not None else 1.0,
                      max_epochs=epochs, limit_train_batches=1, check_val_every_n_epoch=1)
    if mode == 'fit':
        trainer.fit(module, datamodule=datamodule)
    else:
        for _ in range(epochs):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    return recorder.epochs


class _Printer(Callback):
    """Prints the newest :class:`EpochMemory` of the recorder that runs before it."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        recorder = next(c for c in trainer.callbacks if isinstance(c, _Recorder))
        print(format_row(recorder.epochs[-1], recorder.epochs[0]), flush=True)


def format_row(row: EpochMemory, first: EpochMemory) -> str:
    metric = next(iter(row.metrics.items()), ('', float('nan')))
    return (f'epoch {row.epoch:3d}  rss {row.rss_mb:9.1f} MB  ({row.rss_mb - first.rss_mb:+7.1f} vs epoch 1)  '
            f'gc objects {row.gc_objects:8d}  pending results {row.pending_results}  '
            f'{metric[0]} {metric[1]:.4f}')


def growth_mb(rows: Sequence[EpochMemory]) -> float:
    """RSS growth in MiB from the end of epoch ``BASELINE_EPOCH`` to the end of the last epoch."""
    if len(rows) <= BASELINE_EPOCH:
        raise ValueError(f'growth needs more than {BASELINE_EPOCH} epochs, got {len(rows)}')
    return rows[-1].rss_mb - rows[BASELINE_EPOCH - 1].rss_mb


def summary(rows: Sequence[EpochMemory]) -> Dict[str, float]:
    """Growth after epoch 2 (RSS MiB, gc objects) and the largest epoch-to-epoch RSS step after it."""
    base = BASELINE_EPOCH - 1
    steps = [b.rss_mb - a.rss_mb for a, b in zip(rows[base:], rows[base + 1:])]
    return dict(epochs=len(rows), rss_first_mb=rows[0].rss_mb, rss_last_mb=rows[-1].rss_mb,
                growth_mb=growth_mb(rows), max_step_mb=max(steps),
                gc_object_growth=rows[-1].gc_objects - rows[base].gc_objects,
                pending_results_max=max(r.pending_results for r in rows))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='mmengine config file with val_dataloader and val_evaluator')
    parser.add_argument('--epochs', type=int, default=10, help='validation epochs (default 10, at least 3)')
    parser.add_argument('--mode', choices=MODES, default='validate',
                        help='validate: repeated trainer.validate; fit: 1 training batch + validation per epoch')
    parser.add_argument('--checkpoint', help='weights to evaluate (default: the config\'s initialisation)')
    parser.add_argument('--val-batches', type=int, help='validate on the first N batches only')
    parser.add_argument('--max-growth-mb', type=float,
                        help=f'exit 1 when RSS grows by more than this after epoch {BASELINE_EPOCH}')
    parser.add_argument('--json', help='also write the per-epoch rows and the summary to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.max_growth_mb is not None and args.max_growth_mb < 0:
        print(f'check_memory: error: --max-growth-mb must be >= 0, got {args.max_growth_mb}', file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.cfg_options)
        rows = check_memory(cfg, args.epochs, args.mode, args.checkpoint, args.val_batches)
    except (ValueError, FileNotFoundError) as err:
        print(f'check_memory: error: {err}', file=sys.stderr)
        return 2
    result = summary(rows)
    print(f'RSS growth after epoch {BASELINE_EPOCH}: {result["growth_mb"]:+.1f} MB over '
          f'{len(rows) - BASELINE_EPOCH} epochs (largest step {result["max_step_mb"]:+.1f} MB); '
          f'gc objects {result["gc_object_growth"]:+d}; results left in the metrics: '
          f'{result["pending_results_max"]}')
    if args.json:
        payload = dict(summary=result, epochs=[dataclasses.asdict(r) for r in rows])
        atomic_write_text(args.json, json.dumps(payload, indent=2))  # never a half-written file
    if args.max_growth_mb is not None and result['growth_mb'] > args.max_growth_mb:
        print(f'FAIL: growth {result["growth_mb"]:.1f} MB > --max-growth-mb {args.max_growth_mb}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
