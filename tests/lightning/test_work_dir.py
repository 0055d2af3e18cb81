"""One run per work dir: a live run's lock stops a second run, a killed run leaves no stuck lock,
and a new run does not mix its checkpoints with an earlier run's."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config

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


def test_two_train_py_on_one_work_dir(coco_root, tmp_path):
    """Two real ``tools/train.py`` runs (seeds 1 and 2) on one work dir: the second fails at once
    naming the first as the holder, and the first's checkpoint holds seed 1's run."""
    from .test_resume import REPO
    cfg = tiny_maskrcnn_config(coco_root, max_iters=100000)  # stopped by SIGTERM below
    cfg.lightning = dict(enable_progress_bar=False, loggers=['csv'])
    config = tmp_path / 'two.py'
    cfg.dump(str(config))
    work_dir = tmp_path / 'work'

    def start(seed):
        return subprocess.Popen([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir),
                                 '--accelerator', 'cpu', '--seed', str(seed)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start(1)
    try:
        deadline = time.monotonic() + 300
        while not list(work_dir.glob('csv/version_*')) and time.monotonic() < deadline:  # training has begun
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.05)
        second = start(2)
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 1, out[-3000:]
        assert (f"WorkDirBusyError: work dir {str(work_dir)!r} is in use by another training run "
                f"(pid {first.pid} on host {socket.gethostname()}, started ") in out
        assert first.poll() is None  # still training: the refusal came at once
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 143, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    names = _checkpoints(work_dir)
    assert len(names) == 2 and names[1] == 'last.ckpt'  # the SIGTERM checkpoint, and last.ckpt
    assert not (work_dir / 'csv' / 'version_1').exists()  # the refused run wrote no log
    saved = torch.load(work_dir / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert Config.fromstring(saved['meta']['cfg'], '.py').randomness.seed == 1
