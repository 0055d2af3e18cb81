"""Crash-safe checkpoint files: a checkpoint on disk is either complete or absent.

Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction
(``lightning.fabric.utilities.cloud_io._atomic_save``). On a local disk that transaction writes a
temporary file from ``tempfile.mkstemp()`` (the system temp dir, not the checkpoint's folder) and
commits it with ``shutil.move``. That is atomic only when the temp dir and the checkpoint folder
are on the same filesystem (``shutil.move`` falls back to copy-then-delete otherwise, and a
``kill -9`` during the copy leaves a truncated checkpoint), nothing is ``fsync``-ed (a power cut
can leave a renamed but empty file), and a killed process leaks its temp file in ``/tmp``.

:class:`AtomicCheckpointIO` writes every local checkpoint through
:func:`acmix_mm.checkpoint.atomic.atomic_write_bytes`: a temporary file in the target's folder,
fsync-ed, renamed onto the target name, the folder fsync-ed. A process killed at any moment leaves
either the previous file or the new one under the target name, never a prefix of one; a temporary
file left by a killed writer (``.NAME.partial-*``) is removed by the next write to that folder.
Remote paths (``scheme://``) are left to Lightning's fsspec writer.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..checkpoint.atomic import atomic_write_bytes, remove_partial_files


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
