"""Where a checkpoint comes from: a local path, ``torchvision://NAME`` or an http(s) URL."""
from __future__ import annotations

import os

import torch

from .atomic import atomic_write
from .safe import CheckpointError

__all__ = ['resolve_checkpoint']

_URI_SCHEMES = ('torchvision://', 'http://', 'https://')


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """A local file for ``checkpoint``: a path, ``torchvision://NAME`` or an http(s) URL.

    ``torchvision://resnet50`` is the URL mmengine gives that name (its
    ``hub/torchvision_0.12.json``, torchvision's ImageNet weights); URLs are fetched once into
    torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where mmengine and torchvision keep them
    too), written to a temporary name and renamed when complete. The file is then read by
    :func:`safe_load` like any other.

    Raises:
        ValueError: an unknown scheme or torchvision name (the message lists what is allowed).
    """
    checkpoint = os.fspath(checkpoint)
    if '://' not in checkpoint:
        return checkpoint
    if checkpoint.startswith('torchvision://'):
        import mmengine
        names = mmengine.load(os.path.join(mmengine.__path__[0], 'hub', 'torchvision_0.12.json'))
        name = checkpoint[len('torchvision://'):]
        if name not in names:
            raise ValueError(f'unknown torchvision checkpoint {checkpoint!r}; allowed names: '
                             f'{", ".join(sorted(names))}')
        url = names[name]
    elif checkpoint.startswith(('http://', 'https://')):
        url = checkpoint
    else:
        raise ValueError(f'checkpoint {checkpoint!r}: unknown scheme; allowed: a file path or '
                         f'{", ".join(s + "..." for s in _URI_SCHEMES)}')
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, os.path.basename(url.split('?')[0]))
    if not os.path.isfile(path):
        try:
            with atomic_write(path) as partial:
                torch.hub.download_url_to_file(url, partial, progress=False)
        except Exception as err:
            raise CheckpointError(f'checkpoint {checkpoint!r}: downloading {url} into {path} failed '
                                  f'({type(err).__name__}: {err}); put the file there by hand or '
                                  'name a local path') from None
    return path

