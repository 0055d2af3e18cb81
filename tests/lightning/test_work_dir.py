"""One run per work dir: a live run's lock stops a second run, a killed run leaves no stuck lock,
and a new run does not mix its checkpoints with an earlier run's."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from acmix_mm.lightning import train
from acmix_mm.lightning.work_dir import LOCK_NAME, WorkDirBusyError

from .helpers import tiny_maskrcnn_config

_HOLD = ('import sys, time\n'
         'from acmix_mm.lightning.work_dir import WorkDirLock\n'
         'with WorkDirLock(sys.argv[1]):\n'
         '    print("held", flush=True)\n'
         '    time.sleep(120)\n')


def _checkpoints(work_dir):
    return sorted(os.listdir(work_dir / 'checkpoints'))


def test_live_holder_refuses_a_second_run_and_a_killed_one_does_not(coco_root, tmp_path):
    work_dir = tmp_path / 'work'
    holder = subprocess.Popen([sys.executable, '-c', _HOLD, str(work_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        cfg = tiny_maskrcnn_config(coco_root, max_iters=2, work_dir=work_dir)
        with pytest.raises(WorkDirBusyError) as info:
            train(cfg, accelerator='cpu', logger=False)
        message = str(info.value)
        assert message.startswith(f'work dir {str(work_dir)!r} is in use by another training run '
                                  f'(pid {holder.pid} on host {socket.gethostname()}, started ')
        assert message.endswith(f'lock file {work_dir / LOCK_NAME}): wait for it to end, stop it, '
                                'or pass another --work-dir')
        assert sorted(os.listdir(work_dir)) == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The kernel released the killed holder's lock: the run goes ahead.
    train(tiny_maskrcnn_config(coco_root, max_iters=2, work_dir=work_dir), accelerator='cpu', logger=False,
          enable_progress_bar=False)
    assert _checkpoints(work_dir) == ['epoch=0-step=2.ckpt', 'last.ckpt']


def test_new_run_refuses_an_earlier_runs_checkpoints(coco_root, tmp_path):
    work_dir = tmp_path / 'work'
    train(tiny_maskrcnn_config(coco_root, max_iters=2, work_dir=work_dir), accelerator='cpu', logger=False,
          enable_progress_bar=False)
    before = {name: os.stat(work_dir / 'checkpoints' / name).st_mtime_ns for name in _checkpoints(work_dir)}
    second = tiny_maskrcnn_config(coco_root, max_iters=1, work_dir=work_dir)
    with pytest.raises(FileExistsError) as info:
        train(second, accelerator='cpu', logger=False)
    assert str(info.value) == (
        f"work dir {str(work_dir)!r} holds 2 checkpoint(s) of an earlier run (newest: last.ckpt); a new run "
        'would mix its checkpoints with them. Pass --resume to continue that run, --work-dir to start '
        f'elsewhere, or --restart to move {work_dir / "checkpoints"} aside (to checkpoints.old-<time>) '
        'and start over')
    assert {n: os.stat(work_dir / 'checkpoints' / n).st_mtime_ns for n in _checkpoints(work_dir)} == before

    with pytest.raises(ValueError, match='pass only one of them'):
        train(second, resume='auto', restart=True, accelerator='cpu', logger=False)

    train(second, restart=True, accelerator='cpu', logger=False, enable_progress_bar=False)
    old = [d for d in os.listdir(work_dir) if d.startswith('checkpoints.old-')]
    assert len(old) == 1
    assert sorted(os.listdir(work_dir / old[0])) == sorted(before)
    assert _checkpoints(work_dir) == ['epoch=0-step=1.ckpt', 'last.ckpt']
