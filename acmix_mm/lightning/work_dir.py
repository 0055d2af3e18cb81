"""One run per work dir: a lock held for a training run's lifetime, and no silent mixing of runs.

* :class:`WorkDirLock`: ``WORK_DIR/.acmix_mm.lock`` is ``flock``-ed by the run's first process
  (global rank 0) from the moment the run is checked until it ends. A second ``tools/train.py`` on
  the same work dir fails at once, naming the holder (pid, host, start time). The kernel drops the
  lock when the holder dies, ``kill -9`` included, so a killed run never leaves it stuck; the file
  itself stays (it only records the last holder). ``flock`` is local to one machine on some
  network filesystems (older NFS): there, two hosts are not kept apart.
* :func:`check_fresh_work_dir`: a new run (no ``--resume``) in a work dir that already holds
  checkpoints is refused, offering ``--resume``, another ``--work-dir``, or ``--restart``, which
  moves the old ``checkpoints/`` folder aside to ``checkpoints.old-<YYYYmmdd-HHMMSS>`` (nothing is
  deleted) before the run starts.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import socket
import time
from typing import Optional

from .spec import CHECKPOINT_DIR

__all__ = ['LOCK_NAME', 'WorkDirBusyError', 'WorkDirLock', 'check_fresh_work_dir', 'is_launching_process',
           'newest_checkpoint']

LOCK_NAME = '.acmix_mm.lock'


class WorkDirBusyError(RuntimeError):
    """Another live run holds the work dir."""


def is_launching_process() -> bool:
    """True in the process that owns the run: global rank 0 of a DDP job, or a single process.

    The other ranks (started by Lightning with ``LOCAL_RANK``/``NODE_RANK``, or by ``torchrun``
    with ``RANK``) share rank 0's work dir and must not lock it.
    """
    return all(int(os.environ.get(name, '0') or 0) == 0 for name in ('RANK', 'LOCAL_RANK', 'NODE_RANK'))


class WorkDirLock:
    """``with WorkDirLock(work_dir):`` holds ``work_dir`` for this run (see the module docstring).

    Raises:
        WorkDirBusyError: on entry, when another live process holds the lock.
    """

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def __enter__(self) -> 'WorkDirLock':
        os.makedirs(self.work_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkDirBusyError(
                f'work dir {self.work_dir!r} is in use by another training run ({holder}; lock file '
                f'{self.path}): wait for it to end, stop it, or pass another --work-dir') from None
        record = dict(pid=os.getpid(), host=socket.gethostname(),
                      started=time.strftime('%Y-%m-%d %H:%M:%S %z'))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
        return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return 'holder unknown: the lock file does not say'


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


def check_fresh_work_dir(work_dir: str, resuming: bool, restart: bool) -> Optional[str]:
    """Refuse to start a new run over an earlier run's checkpoints (see the module docstring).

    Args:
        work_dir: the run's work dir.
        resuming: the run resumes (``--resume``): the checkpoints are its own.
        restart: ``--restart``: move the old checkpoints aside and start over.

    Returns:
        The folder the old checkpoints were moved to (``restart``), else None.

    Raises:
        FileExistsError: ``WORK_DIR/checkpoints`` holds ``*.ckpt`` files, without ``resuming``
            or ``restart``; nothing is changed.
    """
    folder = os.path.join(work_dir, CHECKPOINT_DIR)
    newest = None if resuming else newest_checkpoint(folder)
    if newest is None:
        return None
    if not restart:
        count = len(glob.glob(os.path.join(glob.escape(folder), '*.ckpt')))
        raise FileExistsError(
            f'work dir {work_dir!r} holds {count} checkpoint(s) of an earlier run (newest: '
            f'{os.path.basename(newest)}); a new run would mix its checkpoints with them. Pass '
            '--resume to continue that run, --work-dir to start elsewhere, or --restart to move '
            f'{folder} aside (to {CHECKPOINT_DIR}.old-<time>) and start over')
    stem = moved = f'{folder}.old-{time.strftime("%Y%m%d-%H%M%S")}'
    suffix = 1
    while os.path.exists(moved):
        moved = f'{stem}-{suffix}'
        suffix += 1
    os.rename(folder, moved)
    return moved
