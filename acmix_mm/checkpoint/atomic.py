"""Atomic, durable writes: a file (or a folder) on disk is either complete or absent.

Every writer of acmix_mm goes through here: Lightning checkpoints
(:class:`~acmix_mm.lightning.checkpoint_io.AtomicCheckpointIO`), ONNX exports, converted
checkpoints, metrics JSON, downloaded weights and the generated demo datasets.

The recipe is POSIX's for an atomic replacement: the bytes go to a hidden temporary file *in the
target's folder* (so the final rename never crosses filesystems, where a move is a copy), are
``fsync``-ed, the file gets the mode an ordinary ``open()`` would give it (``0666 & ~umask``;
``mkstemp`` makes ``0600``), is ``os.replace``-d onto the target name, and the folder is
``fsync``-ed so that the rename itself survives a power cut. A process killed at any moment
leaves the previous file or the new one under the target name, never a prefix of one. Its
temporary file (``.NAME.partial-*``) can be removed with :func:`remove_partial_files`.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Union

__all__ = ['PARTIAL_MARK', 'atomic_write', 'atomic_write_bytes', 'atomic_write_text',
           'atomic_directory', 'partial_files', 'remove_partial_files', 'replace_with_link']

PathLike = Union[str, 'os.PathLike[str]']
PARTIAL_MARK = '.partial-'
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_CHUNK = 8 << 20  # bytes per write() call: a large checkpoint is not one giant syscall


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: str) -> None:
    """fsync a file or a folder by name; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, size: Optional[int] = None) -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block ends normally it becomes ``path``.

    Write the whole content to the yielded path inside the block (``torch.save(obj, tmp)``,
    ``onnx.save(proto, tmp)``, ``open(tmp, 'w')``...). On a normal exit the file is fsync-ed,
    given an ordinary file's mode and renamed onto ``path``, and the folder is fsync-ed. On an
    exception (KeyboardInterrupt included) the temporary file is removed and ``path`` keeps its
    old content (or stays absent).

    Args:
        path: the target file; its folder is created when missing.
        size: the bytes the content will take, when known: a full disk's error names it.

    Raises:
        OSError: the folder cannot be created or written; nothing is left behind. A full disk
            (``ENOSPC``, ``EDQUOT``) gets a message naming ``path``, ``size`` and the free bytes.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}{PARTIAL_MARK}')
    os.close(fd)
    try:
        yield tmp
        _fsync_path(tmp)  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if err.errno in _DISK_FULL:
            raise _disk_full_error(err, path, size) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_path(folder)


def _disk_full_error(err: OSError, path: str, size: Optional[int]) -> OSError:
    """The ``OSError`` of a full disk, naming the file, the bytes it needs and the bytes free."""
    folder = os.path.dirname(path)
    try:
        free = f'{shutil.disk_usage(folder).free:,} bytes are free there'
    except OSError:
        free = 'the free space could not be read'
    need = f'it needs {size:,} bytes' if size is not None else 'its size is not known in advance'
    return OSError(err.errno, f'no space left to write {path} ({err.strerror}): {need}, {free}; '
                   'the previous file under that name, if any, is unchanged', path)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, size=len(data)) as tmp, open(tmp, 'wb') as f:
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            f.write(view[start:start + _CHUNK])


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    atomic_write_bytes(path, text.encode('utf-8'))


def replace_with_link(source: PathLike, target: PathLike) -> None:
    """Make ``target`` a second name of the file ``source`` (a hard link), replacing it atomically.

    No bytes are copied: for a checkpoint that is also reachable as ``last.ckpt``. The files
    written here are never changed in place (each write makes a new file and renames it), so the
    two names cannot drift apart. Where hard links are impossible (some network or FAT file
    systems) the bytes are copied through :func:`atomic_write`.
    """
    source, target = os.fspath(source), os.path.abspath(os.fspath(target))
    folder = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(target)}{PARTIAL_MARK}')
    os.close(fd)
    os.remove(tmp)  # os.link needs a free name; the name stays unguessable and in the folder
    try:
        os.link(source, tmp)
    except OSError:
        with atomic_write(target, size=os.path.getsize(source)) as copy:
            shutil.copyfile(source, copy)
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_path(folder)


@contextlib.contextmanager
def atomic_directory(out_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out_dir``; on success it replaces ``out_dir``.

    Every file written into it is fsync-ed before the folder is renamed into place, so a
    reader sees either the old folder or the complete new one. On an exception the temporary
    folder is removed and ``out_dir`` is untouched.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty folder and ``overwrite`` is false (raised
            before anything is written).
        NotADirectoryError: ``out_dir`` exists and is not a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NotADirectoryError(f'output path {out_dir} exists and is not a folder')
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f'output folder {out_dir} is not empty; pass overwrite=True '
                                  '(--overwrite) to replace it')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}{PARTIAL_MARK}', dir=out_dir.parent))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_path(os.path.join(root, name))
            _fsync_path(root)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old-', dir=out_dir.parent))
            os.rename(out_dir, old / 'data')
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(str(out_dir.parent))


def partial_files(folder: PathLike) -> List[str]:
    """The temporary files that interrupted :func:`atomic_write` calls left in ``folder``."""
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), '.*' + PARTIAL_MARK + '*')))


def remove_partial_files(folder: PathLike, keep: Optional[str] = None) -> List[str]:
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
