"""SIGTERM (preemption) ends a run with a resumable checkpoint and exit code 143, not as finished.

Schedulers stop a job with SIGTERM and a grace period before SIGKILL: Slurm at preemption or at
the time limit, ``docker stop``, Kubernetes. Lightning's own handling lets the process end with
exit code 0, which a scheduler reads as a finished run. Here instead:

1. :class:`StopOnSigterm` replaces the SIGTERM handler when training starts. The handler only
   records the signal (and forwards it to the DDP processes Lightning started, as Lightning does);
   nothing is saved inside the handler, where the step in progress is half done.
2. At the next step boundary, after the step's schedule update and before any validation or
   checkpoint of that step, every rank agrees (any rank signalled: all stop at the same step), and
   the run writes ``WORK_DIR/checkpoints/epoch=E-step=S.ckpt`` atomically, with ``last.ckpt``
   pointing at the same bytes. The checkpoint holds what a step-interval checkpoint holds (data
   position, schedules, random states), so ``--resume`` continues bit-exactly. Three special
   cases: at the last batch of an epoch the run stops after the epoch's end (its validation, when
   one is due), because Lightning resumes a checkpoint of the last batch as if the epoch's end had
   run; a validation due right after the stopped step is skipped by the resumed run, as Lightning
   does for any checkpoint of that moment; and a run in its last step, or at the end of its last
   epoch, finishes normally.
3. One log line names the checkpoint and the command that resumes it, and :class:`RunPreempted`
   is raised: a ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM, what a
   process killed by SIGTERM reports), which ``tools/train.py`` exits with.

SIGINT (Ctrl+C) keeps Lightning's behaviour: the step in progress is abandoned, no checkpoint is
written, and the process exits 1. Training then resumes from the last regular checkpoint.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading
from typing import Any, Optional

from lightning.pytorch import Callback
from mmengine.logging import MMLogger

from ..checkpoint.atomic import replace_with_link

__all__ = ['PREEMPTED_EXIT_CODE', 'RunPreempted', 'StopOnSigterm', 'resume_command']

#: The exit code of a run stopped by SIGTERM (128 + 15): requeue on it.
PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)


class RunPreempted(SystemExit):
    """Training stopped on SIGTERM after writing a resumable checkpoint.

    A ``SystemExit`` (code :data:`PREEMPTED_EXIT_CODE`), so a script that does not catch it exits
    with that code.

    Attributes:
        checkpoint: path of the checkpoint written at the stop.
        global_step: the optimiser steps it holds.
    """

    def __init__(self, checkpoint: str, global_step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint = checkpoint
        self.global_step = global_step


class StopOnSigterm(Callback):
    """Turn SIGTERM into a checkpoint at the next step boundary and :class:`RunPreempted`.

    Must run after the schedules' per-step update (``MMLightningModule.configure_callbacks``
    lists it after it) so that the checkpoint holds the stepped schedules.

    Args:
        checkpoint_dir: where the checkpoint goes (``WORK_DIR/checkpoints``).
        resume_command: what the log line tells the user to run to continue.
    """

    def __init__(self, checkpoint_dir: str, resume_command: str):
        self.checkpoint_dir = checkpoint_dir
        self.resume_command = resume_command
        self.signalled = False
        self._previous: Any = None
        self._installed = False
        self._trainer: Any = None

    # -- the handler ------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Here, after Lightning registered its own SIGTERM handler (Trainer._run), so that this
        # one replaces it: Lightning's ends the run at a point of its choosing, with exit code 0.
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; nothing to install elsewhere
        self._trainer = trainer
        self.signalled = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            self.signalled = True
            # DDP processes that Lightning started from this one do not get the scheduler's
            # signal when only this process does (docker stop): pass it on, as Lightning does.
            launcher = getattr(self._trainer.strategy, 'launcher', None) if self._trainer else None
            if launcher is not None and hasattr(launcher, 'kill'):
                launcher.kill(signum)

    def _restore_handler(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        self._trainer = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()

    # -- the stop ---------------------------------------------------------------------------------
    def _stop_requested(self, trainer) -> bool:
        stop = self.signalled
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)  # any rank signalled
        return bool(stop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._stop_requested(trainer) or trainer.should_stop:
            return  # no signal, or this was the run's last step anyway
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last batch: Lightning resumes a checkpoint of this moment as if the
            # epoch's end (validation, epoch-end hooks) had run. Stop after the end instead.
            return
        self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        max_epochs = trainer.max_epochs
        last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
        if self._stop_requested(trainer) and not trainer.should_stop and not last_epoch:
            self._stop(trainer)

    def _stop(self, trainer) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        path = os.path.join(self.checkpoint_dir, f'epoch={epoch}-step={step}.ckpt')
        trainer.save_checkpoint(path)  # collective; rank 0 writes, atomically
        if trainer.is_global_zero:
            replace_with_link(path, os.path.join(self.checkpoint_dir, 'last.ckpt'))
            MMLogger.get_current_instance().warning(
                f'SIGTERM: stopped after step {step} (epoch {epoch}) and saved {path}; resume with: '
                f'{self.resume_command}')
        raise RunPreempted(path, step)


def resume_command(config_file: Optional[str], work_dir: str) -> str:
    """The ``tools/train.py`` command that continues the run in ``work_dir``."""
    config = shlex.quote(config_file) if config_file else 'CONFIG'
    return (f'python tools/train.py {config} --work-dir {shlex.quote(work_dir)} --resume '
            '(with the options of this run)')
