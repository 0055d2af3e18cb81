"""``train`` and ``test``: what ``tools/train.py`` and ``tools/test.py`` do, as functions.

Both check every input (config sections, dataset paths, checkpoint) before anything is built
or written, so that a bad value fails fast with a message naming it and leaves no output.
"""
from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_only
from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger

from .checkpoint import StartCheckpoint, load_checkpoint_file, load_model_weights
from .config import ConfigLike, LoopSpec, apply_loop_spec, as_config
from .data import MMDataModule
from .module import MMLightningModule
from .outputs import VisualizationCallback, format_metrics, prepare_output_location, redirect_outputs
from .trainer import CHECKPOINT_DIR, TrainerOverrides, build_trainer, lightning_section

AUTO_RESUME = 'auto'


def resolve_work_dir(cfg: Config, work_dir: Optional[str]) -> str:
    """``--work-dir``, else ``cfg.work_dir``, else ``./work_dirs/<config file stem>``."""
    if work_dir:
        return str(work_dir)
    if cfg.get('work_dir'):
        return str(cfg.work_dir)
    stem = Path(cfg.filename).stem if getattr(cfg, 'filename', None) else 'default'
    return os.path.join('work_dirs', stem)


def newest_checkpoint(folder: str) -> Optional[str]:
    """The most recently completed ``*.ckpt`` in ``folder`` (None if there is none).

    Checkpoints are renamed into place only once whole (checkpoint_io.py), so a file's mtime is
    when its write completed. ``last.ckpt`` is normally the newest; a kill between writing
    ``epoch=E-step=S.ckpt`` and ``last.ckpt`` leaves the former newer (or last.ckpt absent).
    """
    paths = glob.glob(os.path.join(folder, '*.ckpt'))
    if not paths:
        return None
    return max(paths, key=lambda p: (os.stat(p).st_mtime_ns, os.path.basename(p) == 'last.ckpt'))


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
          **trainer_kwargs: Any) -> MMLightningModule:
    """Train the config's model with Lightning; returns the trained module.

    Args:
        cfg: config (object, dict or path); ``--cfg-options`` are merged by the caller.
        work_dir: checkpoints, logs and the config copy go here (see :func:`resolve_work_dir`).
        resume: a checkpoint path, or ``'auto'`` for the newest checkpoint in the work dir (:func:`resolve_resume`).
        overrides: command-line Trainer values (devices, strategy, precision, max epochs/steps).
        seed: global seed (``--seed``), else ``cfg.randomness.seed``.
        **trainer_kwargs: extra ``lightning.pytorch.Trainer`` arguments.
    """
    cfg = as_config(cfg)
    overrides = overrides or TrainerOverrides()
    lightning_section(cfg)  # unknown keys fail before anything runs
    loop = LoopSpec.from_config(cfg).with_limits(overrides.max_epochs, overrides.max_steps)
    apply_loop_spec(cfg, loop)
    work_dir = resolve_work_dir(cfg, work_dir)
    cfg.work_dir = work_dir
    randomness = dict(cfg.get('randomness') or {})
    if seed is not None:
        randomness['seed'] = seed
        cfg.randomness = ConfigDict(randomness)
    seed = randomness.get('seed')
    datamodule = MMDataModule(cfg, seed=seed)
    datamodule.check('fit')
    datamodule.setup('fit')  # read and check the datasets before any output is written
    ckpt_path = resolve_resume(resume, work_dir)
    # --resume / load_from: read and checked now, a clear error before anything is built
    start = StartCheckpoint.read(ckpt_path, cfg.get('load_from'))
    if seed is not None:
        seed_everything(seed, workers=False, verbose=False)
    module = MMLightningModule(cfg)
    start.apply(module.model)  # --resume: the weights fit the model; load_from: loads them
    trainer = build_trainer(cfg, work_dir, overrides, **trainer_kwargs)
    _dump_config(cfg, work_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return module


@rank_zero_only
def _dump_config(cfg: Config, work_dir: str) -> None:
    os.makedirs(work_dir, exist_ok=True)
    name = Path(cfg.filename).name if getattr(cfg, 'filename', None) else 'config.py'
    cfg.dump(os.path.join(work_dir, name))


def test(cfg: ConfigLike, checkpoint: str, work_dir: Optional[str] = None, out: Optional[str] = None,
         show_dir: Optional[str] = None, overrides: Optional[TrainerOverrides] = None,
         **trainer_kwargs: Any) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` on ``test_dataloader`` with ``test_evaluator``; returns the metrics.

    The metrics are printed as a table (rank 0) and written to ``WORK_DIR/metrics_<time>.json``.

    Args:
        out: write predictions: for ``CocoMetric`` the COCO results JSON ``OUT.bbox.json``
            (and ``OUT.segm.json``); for ``IoUMetric`` one label PNG per image in folder ``OUT``.
        show_dir: draw predictions onto the images into this folder.
    """
    cfg = as_config(cfg)
    overrides = overrides or TrainerOverrides()
    section = lightning_section(cfg)
    for key in ('test_dataloader', 'test_evaluator'):
        if not cfg.get(key):
            raise ValueError(f'the config has no {key}, which testing needs')
    if out:
        cfg.test_evaluator = redirect_outputs(cfg.test_evaluator, out)
    work_dir = resolve_work_dir(cfg, work_dir)
    # Read (safely) before anything is built: a bad file fails fast, naming it and what is wrong.
    contents = load_checkpoint_file(checkpoint)
    datamodule = MMDataModule(cfg)
    datamodule.check('test')
    datamodule.setup('test')  # read and check the dataset before any output is written
    module = MMLightningModule(cfg, init_weights=False)
    load_model_weights(module.model, checkpoint, contents)
    del contents  # the weights are in the model now
    callbacks = []
    if show_dir:
        callbacks.append(VisualizationCallback(cfg.get('visualizer'), show_dir))
    if out:
        prepare_output_location(cfg.test_evaluator, out)
    kwargs: Dict[str, Any] = dict(
        accelerator=overrides.accelerator or section.get('accelerator', 'auto'),
        devices=overrides.devices if overrides.devices is not None else section.get('devices', 1),
        num_nodes=overrides.num_nodes or section.get('num_nodes', 1),
        strategy=overrides.strategy or section.get('strategy', 'auto'),
        precision=overrides.precision or section.get('precision') or '32-true',
        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=section.get('enable_progress_bar', True), default_root_dir=work_dir,
        callbacks=callbacks)
    kwargs.update(trainer_kwargs)
    trainer = Trainer(**kwargs)
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
        os.makedirs(work_dir, exist_ok=True)
        path = os.path.join(work_dir, f'metrics_{time.strftime("%Y%m%d_%H%M%S")}.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(metrics, f, indent=2)
        os.replace(path + '.tmp', path)  # no half-written metrics file
    return metrics
