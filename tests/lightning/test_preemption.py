"""SIGTERM: a checkpoint at the next step boundary, exit code 143, and an exact resume.

* In-process: the run signals itself during a chosen step; ``train`` raises ``RunPreempted``
  (code 143) after writing ``epoch=E-step=S.ckpt`` (and ``last.ckpt``, the same file), and a
  ``resume='auto'`` run ends in the state of an uninterrupted one. The chosen steps are the hard
  ones: the last batch of an epoch (the run stops after that epoch's validation), a step in the
  middle of an epoch, and a step after which iteration-loop validation is due (the resumed run
  skips it, as Lightning does for any checkpoint of that moment).
* A real ``tools/train.py`` subprocess gets ``kill -TERM`` from outside: it exits 143 with one log
  line naming the checkpoint and the resume command, and ``--resume`` runs it to the end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from lightning.pytorch import Callback

from acmix_mm.lightning import PREEMPTED_EXIT_CODE, RunPreempted, train

from .test_resume import REPO, _load, assert_same_final_state, coco6, resume_config  # noqa: F401


class _SignalDuring(Callback):
    """Send this process SIGTERM while step ``step`` (1-based) is being computed."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize('loop,step,name', [
    ('epoch', 3, 'epoch=0-step=3.ckpt'),  # the last batch of epoch 0: validation is due after it
    ('epoch', 5, 'epoch=1-step=5.ckpt'),  # mid-epoch
    ('iter', 4, 'epoch=1-step=4.ckpt'),   # val_interval=2: validation is due after it
])
def test_sigterm_checkpoints_the_step_and_resume_is_exact(coco6, tmp_path, loop, step, name):  # noqa: F811
    cfg = (resume_config(coco6, max_epochs=3) if loop == 'epoch'
           else resume_config(coco6, max_iters=6, interval=2))
    train(cfg.copy(), work_dir=str(tmp_path / 'ref'), accelerator='cpu')

    work = tmp_path / 'stopped'
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunPreempted) as stop:
        train(cfg.copy(), work_dir=str(work), accelerator='cpu', callbacks=[_SignalDuring(step)])
    assert stop.value.code == PREEMPTED_EXIT_CODE == 143
    folder = work / 'checkpoints'
    assert stop.value.checkpoint == str(folder / name) and stop.value.global_step == step
    saved = _load(folder / name)
    assert saved['global_step'] == step
    assert os.path.samefile(folder / name, folder / 'last.ckpt')
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the process's handler is back

    train(cfg.copy(), work_dir=str(work), resume='auto', accelerator='cpu')
    assert_same_final_state(_load(tmp_path / 'ref' / 'checkpoints' / 'last.ckpt'), _load(folder / 'last.ckpt'))


def test_kill_term_of_train_py_exits_143_and_resumes(coco6, tmp_path):  # noqa: F811
    cfg = resume_config(coco6, max_iters=12, interval=4)
    config = tmp_path / 'sigterm.py'
    cfg.dump(str(config))
    work = tmp_path / 'work'
    args = [sys.executable, 'tools/train.py', str(config), '--work-dir', str(work), '--accelerator', 'cpu']
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Signal once training is under way: the first metrics row means a step has been logged.
    deadline = time.monotonic() + 600
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((work / 'csv').glob('version_*/metrics.csv'))
        if found and found[0].stat().st_size > 0 and len(found[0].read_text().splitlines()) >= 2:
            metrics = found[0]
            break
        time.sleep(0.02)
    assert metrics is not None, proc.stdout.read().decode()[-4000:] if proc.poll() is not None else 'no step logged'
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    log = out.decode()
    assert proc.returncode == 143, log[-4000:]
    lines = [line for line in log.splitlines() if 'SIGTERM: stopped after step' in line]
    assert len(lines) == 1, log[-4000:]
    saved = sorted((work / 'checkpoints').glob('epoch=*.ckpt'), key=lambda p: p.stat().st_mtime_ns)[-1]
    step = _load(saved)['global_step']
    assert 1 <= step < 12
    assert f'stopped after step {step} ' in lines[0] and str(saved) in lines[0]
    assert f'--work-dir {work} --resume' in lines[0]
    assert os.path.samefile(saved, work / 'checkpoints' / 'last.ckpt')

    resumed = subprocess.run(args + ['--resume'], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-4000:]
    assert _load(work / 'checkpoints' / 'last.ckpt')['global_step'] == 12

