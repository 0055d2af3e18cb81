"""Crash-safe checkpoint files: a checkpoint on disk is either complete or absent.

Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction
(``lightning.fabric.utilities.cloud_io._atomic_save``). On a local disk that transaction writes a
temporary file from ``tempfile.mkstemp()`` (the system temp dir, not the checkpoint's folder) and
commits it with ``shutil.move``. That is atomic only when the temp dir and the checkpoint folder
are on the same filesystem (``shutil.move`` falls back to copy-then-delete otherwise, and a
``kill -9`` during the copy leaves a truncated checkpoint), nothing is ``fsync``-ed (a power cut
can leave a renamed but empty file), and a killed process leaks its temp file in ``/tmp``.

:class:`AtomicCheckpointIO` writes every checkpoint as POSIX prescribes for an atomic
replacement: the bytes go to a hidden temporary file *in the target's folder*, are flushed and
``fsync``-ed, the file is ``os.replace``-d onto the target name (atomic within a filesystem), and
the folder is ``fsync``-ed so the rename itself is durable. A process killed at any moment leaves
either the previous file or the new one under the target name, never a prefix of one; a temporary
file left by a killed writer (``.NAME.partial-*``) is removed by the next write to that folder.
Remote paths (``scheme://``) are left to Lightning's fsspec writer.
"""
from __future__ import annotations

import glob
import io
import os
import tempfile
from typing import Any, Dict, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_MARK = '.partial-'
_CHUNK = 8 << 20  # bytes per write() call: a large checkpoint is not one giant syscall


def partial_files(folder: str) -> list:
    """The temporary files that interrupted :func:`atomic_write_bytes` calls left in ``folder``."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), '.*' + PARTIAL_MARK + '*')))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    Args:
        path: the target file (its folder is created if missing).
        data: the complete new content.

    Raises:
        OSError: the write failed; ``path`` is unchanged and the temporary file is removed.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # Same folder, so os.replace never crosses filesystems (a cross-device move is a copy).
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}{PARTIAL_MARK}')
    try:
        with os.fdopen(fd, 'wb') as f:
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):
                f.write(view[start:start + _CHUNK])
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a temp file behind when we are still alive.
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_files(folder: str, keep: Optional[str] = None) -> list:
    """Delete temporary files left in ``folder`` by killed writers; returns the removed paths."""
    removed = []
    for stale in partial_files(folder):
        if keep is not None and os.path.abspath(stale) == os.path.abspath(keep):
            continue
        try:
            os.remove(stale)
            removed.append(stale)
        except OSError:
            pass
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (see the module docstring).

    Loading is Lightning's (``torch.load``; the Trainer passes ``weights_only``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set = set()

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        """Serialise ``checkpoint`` with ``torch.save`` and write it atomically to ``path``."""
        path = str(path)
        if '://' in path and not path.startswith('file://'):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f'{type(self).__name__}.save_checkpoint takes no storage_options '
                            f'(got {storage_options!r}) for the local path {path!r}')
        path = path[len('file://'):] if path.startswith('file://') else path
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in self._cleaned:
            # Leftovers of a run killed while it wrote; only files this writer names so.
            remove_partial_files(folder)
            self._cleaned.add(folder)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())
