"""Image files: cheap start-up checks, and clear errors where the loader reads them.

Two costs set the split:

* **At start-up, only names.** :func:`missing_files` lists each image folder once
  (``os.scandir``) and compares names, so a dataset of COCO's 118k training images is checked
  for missing files in one directory read instead of 118k ``open`` calls.
* **In the loader, the content.** :class:`CheckedLoad` wraps a pipeline's loading transform
  (mmcv's ``LoadImageFromFile``, mmseg's ``LoadAnnotations``). The file is read there anyway; when
  decoding fails, the error names the file and says what it is (missing now, not an image at all,
  or an image that is truncated or corrupt) instead of mmcv's ``failed to load image``. It also
  compares the decoded image's size with the size the annotation file gives (``height``,
  ``width`` in the sample), which boxes and polygon masks are drawn at.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

from mmcv.transforms import BaseTransform

__all__ = ['IMAGE_SIGNATURES', 'image_format', 'missing_files', 'CheckedLoad', 'describe_unreadable',
           'wrap_loaders', 'listed']

# Leading bytes of the image formats that mmcv's cv2/PIL decoders read.
IMAGE_SIGNATURES: Dict[str, tuple] = {
    'JPEG': (b'\xff\xd8\xff',),
    'PNG': (b'\x89PNG\r\n\x1a\n',),
    'BMP': (b'BM',),
    'GIF': (b'GIF87a', b'GIF89a'),
    'TIFF': (b'II*\x00', b'MM\x00*'),
    'WebP': (b'RIFF',),  # + 'WEBP' at offset 8, checked below
}

_HEADER_BYTES = 16
_MAX_LISTED = 3  # how many paths an error message lists before it summarises the rest


def listed(items: Sequence[Any]) -> str:
    """``'a', 'b', 'c' and 4 more``: the first few items of an error message's list."""
    shown = ', '.join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f' and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else '')


def image_format(head: bytes) -> Optional[str]:
    """The format whose signature ``head`` (a file's first 16 bytes) starts with, or None."""
    for name, signatures in IMAGE_SIGNATURES.items():
        if any(head.startswith(s) for s in signatures):
            if name == 'WebP' and head[8:12] != b'WEBP':
                return None
            return name
    return None


def missing_files(paths: Iterable[str]) -> List[str]:
    """The paths among ``paths`` that are not files, in their order, from one listing per folder.

    A folder that cannot be listed (missing, or not readable) makes all of its paths missing.
    """
    paths = list(paths)
    listings: Dict[str, Set[str]] = {}
    missing = []
    for path in paths:
        folder, name = osp.split(path)
        if folder not in listings:
            try:
                with os.scandir(folder or '.') as entries:
                    listings[folder] = {e.name for e in entries if e.is_file()}
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(path)
    return missing


def describe_unreadable(path: Optional[str], error: BaseException, what: str, source: str) -> str:
    """Why ``path`` could not be loaded: missing, not an image file, or truncated/corrupt.

    Args:
        path: the file.
        error: what the loader raised.
        what: ``'image'`` or ``'label map'``.
        source: what lists the file, e.g. ``"annotation file 'x.json'"``.
    """
    if not path or not osp.isfile(path):
        return f'{what} file {path!r} listed in {source} does not exist (any more)'
    size = osp.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(_HEADER_BYTES)
    fmt = image_format(head)
    if fmt is None:
        return (f'{what} file {path!r} listed in {source} is not an image file ({size:,} bytes, '
                f'starting {head[:12]!r}); allowed formats: {", ".join(IMAGE_SIGNATURES)}')
    return (f'{what} file {path!r} listed in {source} could not be decoded: it starts like a {fmt} '
            f'file ({size:,} bytes) but is truncated or corrupt ({type(error).__name__}: {error})')


class CheckedLoad(BaseTransform):
    """A pipeline's loading transform, with clear errors and a size check.

    Args:
        loader: the transform to run (mmcv ``LoadImageFromFile``, mmseg ``LoadAnnotations``, ...).
        path_key: the ``results`` key of the file it reads (``'img_path'``, ``'seg_map_path'``).
        what: ``'image'`` or ``'label map'``, for messages.
        source: what lists the files, for messages.
        check_size: compare the loaded image's height and width (``ori_shape``) with the
            sample's ``height`` and ``width`` (what the annotation file says) when both exist.

    Raises (from ``transform``):
        ValueError: the file cannot be decoded (naming it and why), or its size differs from
            the annotation file's.
    """

    def __init__(self, loader: Any, path_key: str, what: str, source: str, check_size: bool = False):
        super().__init__()
        self.loader = loader
        self.path_key = path_key
        self.what = what
        self.source = source
        self.check_size = check_size

    def transform(self, results: dict) -> Optional[dict]:
        try:
            out = self.loader(results)
        except (AssertionError, OSError, ValueError) as error:
            # mmcv: AssertionError 'failed to load image'; mmengine's file backend: FileNotFoundError.
            path = results.get(self.path_key)
            raise ValueError(describe_unreadable(path, error, self.what, self.source)) from error
        if out is not None and self.check_size:
            self._check_size(out)
        return out

    def _check_size(self, results: dict) -> None:
        height, width = results.get('height'), results.get('width')
        shape = results.get('ori_shape')
        if height is None or width is None or shape is None:
            return
        expected, got = (int(height), int(width)), tuple(int(s) for s in shape[:2])
        if got == expected:
            return
        hint = ''
        if got == expected[::-1]:
            hint = (" The sizes are swapped: an EXIF orientation tag may rotate the image as it is "
                    "decoded; LoadImageFromFile(color_type='color_ignore_orientation') reads it as stored.")
        raise ValueError(
            f'{self.what} {results.get(self.path_key)!r} is {got[0]}x{got[1]} (HxW) but {self.source} '
            f'gives height={expected[0]}, width={expected[1]}: its boxes and masks would be placed '
            f'on an image of another size. Correct the annotation file or the image.{hint}')

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.loader!r}, check_size={self.check_size})'


def wrap_loaders(transforms: Sequence[Any], wrappers: Sequence[tuple]) -> List[Any]:
    """``transforms`` with each instance of a loader class wrapped in :class:`CheckedLoad`.

    Args:
        transforms: a ``Compose``'s transform list.
        wrappers: ``(loader_class, CheckedLoad keyword arguments)`` pairs; the first class an
            instance matches wraps it. Instances already wrapped are left as they are.
    """
    out = []
    for transform in transforms:
        for cls, kwargs in wrappers:
            if isinstance(transform, cls) and not isinstance(transform, CheckedLoad):
                transform = CheckedLoad(transform, **kwargs)
                break
        out.append(transform)
    return out
