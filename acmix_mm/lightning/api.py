"""``train`` and ``test``: what ``tools/train.py`` and ``tools/test.py`` do, as functions.

Both check every input (config sections, dataset paths, checkpoint) before anything is built
or written, so that a bad value fails fast with a message naming it and leaves no output.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from lightning.pytorch import seed_everything
from lightning.pytorch.utilities import rank_zero_only
from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger

from ..checkpoint import load_checkpoint_dict, load_model_weights
from ..checkpoint.atomic import atomic_write_text
from .config import ConfigLike, as_config
from .data import MMDataModule
from .module import MMLightningModule
from .outputs import (VisualizationCallback, check_score_thr, format_metrics, prepare_output_location,
                      redirect_outputs)
from .spec import CHECKPOINT_DIR, RunSpec, TrainerOverrides, apply_loop_spec
from .start_checkpoint import StartCheckpoint
from .trainer import build_trainer
from .work_dir import WorkDirLock, check_fresh_work_dir, is_launching_process, newest_checkpoint

AUTO_RESUME = 'auto'


def resolve_resume(resume: Optional[str], work_dir: str) -> Optional[str]:
    """The checkpoint to resume: a path, or ``'auto'`` for the newest whole checkpoint in
    ``WORK_DIR/checkpoints`` (``last.ckpt``, unless the run died right before updating it)."""
    if resume is None:
        return None
    if resume == AUTO_RESUME:
        folder = os.path.join(work_dir, CHECKPOINT_DIR)
        path = newest_checkpoint(folder)
        if path is None:
            # A run killed before (or while) writing its first checkpoint leaves none: checkpoints
            # are written atomically (checkpoint_io.py), so there is never a partial one.
            raise FileNotFoundError(
                f'--resume: no checkpoint in {folder!r}; the run in this work dir has not written a '
                'checkpoint yet: start it again without --resume, or pass --resume CKPT')
        return path
    if not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume: checkpoint {resume!r} does not exist')
    return resume


def train(cfg: ConfigLike, work_dir: Optional[str] = None, resume: Optional[str] = None,
          overrides: Optional[TrainerOverrides] = None, seed: Optional[int] = None,
          restart: bool = False, **trainer_kwargs: Any) -> MMLightningModule:
    """Train the config's model with Lightning; returns the trained module.

    The run holds its work dir (:class:`~acmix_mm.lightning.work_dir.WorkDirLock`): a second run
    on it fails at once. A new run refuses a work dir holding an earlier run's checkpoints
    unless ``restart`` (:func:`~acmix_mm.lightning.work_dir.check_fresh_work_dir`).

    Args:
        cfg: config (object, dict or path); ``--cfg-options`` are merged by the caller.
        work_dir: checkpoints, logs and the config copy go here (see :func:`resolve_work_dir`).
        resume: a checkpoint path, or ``'auto'`` for the newest checkpoint in the work dir (:func:`resolve_resume`).
        overrides: command-line Trainer values (devices, strategy, precision, max epochs/steps).
        seed: global seed (``--seed``), else ``cfg.randomness.seed``.
        restart: ``--restart``: move an earlier run's ``checkpoints/`` aside and start over.
        **trainer_kwargs: extra ``lightning.pytorch.Trainer`` arguments.
    """
    if restart and resume is not None:
        raise ValueError('restart=True (--restart) starts a new run and resume (--resume) continues one: '
                         'pass only one of them')
    cfg = as_config(cfg)
    spec = RunSpec.from_config(cfg, 'fit', work_dir=work_dir, seed=seed, overrides=overrides)
    # The config copy in the work dir and each checkpoint's meta show the run as it ran.
    apply_loop_spec(cfg, spec.loop)
    cfg.work_dir = spec.work_dir
    if seed is not None:
        cfg.randomness = ConfigDict(dict(cfg.get('randomness') or {}, seed=seed))
    datamodule = MMDataModule(cfg, spec)
    datamodule.check('fit')
    datamodule.setup('fit')  # read and check the datasets before any output is written
    ckpt_path = resolve_resume(resume, spec.work_dir)
    # --resume / load_from: read and checked now, a clear error before anything is built
    start = StartCheckpoint.read(ckpt_path, cfg.get('load_from'), spec.loop)
    if spec.seed is not None:
        seed_everything(spec.seed, workers=False, verbose=False)
    module = MMLightningModule(cfg, spec)
    start.apply(module.model)  # --resume: the weights fit the model; load_from: loads them
    owner = is_launching_process()  # the other ranks share rank 0's work dir, lock and checks
    with WorkDirLock(spec.work_dir) if owner else contextlib.nullcontext():
        if owner:
            moved = check_fresh_work_dir(spec.work_dir, resuming=ckpt_path is not None, restart=restart)
            if moved:
                MMLogger.get_current_instance().info(f'--restart: moved the earlier checkpoints to {moved}')
        trainer = build_trainer(spec, **trainer_kwargs)
        _dump_config(cfg, spec.work_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return module


@rank_zero_only
def _dump_config(cfg: Config, work_dir: str) -> None:
    name = Path(cfg.filename).name if getattr(cfg, 'filename', None) else 'config.py'
    # cfg.dump() with no file gives the text in the format of the config's own file.
    atomic_write_text(os.path.join(work_dir, name), cfg.dump())


def test(cfg: ConfigLike, checkpoint: str, work_dir: Optional[str] = None, out: Optional[str] = None,
         show_dir: Optional[str] = None, overrides: Optional[TrainerOverrides] = None,
         show_score_thr: Optional[float] = None, **trainer_kwargs: Any) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` on ``test_dataloader`` with ``test_evaluator``; returns the metrics.

    The metrics are printed as a table (rank 0) and written to ``WORK_DIR/metrics_<time>.json``.

    Args:
        out: write predictions: for ``CocoMetric`` the COCO results JSON ``OUT.bbox.json``
            (and ``OUT.segm.json``); for ``IoUMetric`` one label PNG per image in folder ``OUT``.
        show_dir: draw predictions onto the images into this folder.
        show_score_thr: with ``show_dir``, draw only detections scoring at least this (0..1;
            default: the visualizer's own, 0.3 for mmdet's). Detection configs only.
    """
    cfg = as_config(cfg)
    check_score_thr(show_score_thr)
    if show_score_thr is not None and not show_dir:
        raise ValueError(f'show_score_thr={show_score_thr} needs show_dir (it only filters drawings)')
    spec = RunSpec.from_config(cfg, 'test', work_dir=work_dir, overrides=overrides)
    for key in ('test_dataloader', 'test_evaluator'):
        if not cfg.get(key):
            raise ValueError(f'the config has no {key}, which testing needs')
    if out:
        cfg.test_evaluator = redirect_outputs(cfg.test_evaluator, out)
    # Read (safely) before anything is built: a bad file fails fast, naming it and what is wrong.
    contents = load_checkpoint_dict(checkpoint)
    datamodule = MMDataModule(cfg, spec)
    datamodule.check('test')
    datamodule.setup('test')  # read and check the dataset before any output is written
    module = MMLightningModule(cfg, spec, init_weights=False)
    load_model_weights(module.model, checkpoint, contents)
    del contents  # the weights are in the model now
    callbacks = []
    if show_dir:
        callbacks.append(VisualizationCallback(cfg.get('visualizer'), show_dir,
                                               score_thr=show_score_thr))
    if out:
        prepare_output_location(cfg.test_evaluator, out)
    trainer = build_trainer(spec, **{'logger': False, 'enable_checkpointing': False, 'callbacks': callbacks,
                                     **trainer_kwargs})
    work_dir = spec.work_dir
    if trainer.is_global_zero:
        # Metrics print their reports through mmengine's current logger (mmseg IoUMetric's
        # per-class table, pycocotools' summary); a logger with a file keeps them in the work dir.
        os.makedirs(work_dir, exist_ok=True)
        stamp = time.strftime('%Y%m%d_%H%M%S')
        MMLogger.get_instance(f'acmix_mm_test_{stamp}_{os.getpid()}',
                              log_file=os.path.join(work_dir, f'test_{stamp}.log'))
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = module.metrics.get('test', {})
    if trainer.is_global_zero:
        print(format_metrics(metrics))
        path = os.path.join(work_dir, f'metrics_{time.strftime("%Y%m%d_%H%M%S")}.json')
        atomic_write_text(path, json.dumps(metrics, indent=2))  # no half-written metrics file
    return metrics
