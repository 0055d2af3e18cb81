"""Convert the ACMix authors' ImageNet checkpoint into a plain acmix_mm backbone state_dict.

    python tools/convert_official_ckpt.py SRC DST [--arch swin|resnet] [--prefix backbone.]

The source is read safely (nothing in it executes; see acmix_mm.checkpoint.safe); DST holds
only tensors (``torch.load(weights_only=True)`` and mmengine's default loader read it). Swin:
``layers.i`` -> ``stages.i``, final ``norm`` -> ``norm{last}``, classifier and recomputed buffers
dropped. ResNet: the classifier ``fc.*`` dropped. ``--prefix backbone.`` gives keys for a whole
detector/segmentor (mmengine's ``load_from``). DST is written to a temporary file in the same
folder and renamed: an interrupted run never leaves a half-written DST.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import List, Optional

import torch

from acmix_mm.checkpoint import (CheckpointError, atomic_write, backbone_state_dict, convert_resnet_authors,
                                 convert_swin_authors, safe_load)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help="the authors' checkpoint (.pth)")
    parser.add_argument('dst', help='where to write the converted state_dict')
    parser.add_argument('--arch', choices=('swin', 'resnet'), default='swin',
                        help='which of the authors\' layouts SRC has (default: swin)')
    parser.add_argument('--prefix', default='',
                        help="prepended to every key, e.g. 'backbone.' for load_from")
    return parser.parse_args(argv)


def convert(src: str, dst: str, arch: str = 'swin', prefix: str = '') -> int:
    """Convert ``src`` into ``dst`` atomically; returns the number of keys written."""
    if arch not in ('swin', 'resnet'):
        raise ValueError(f"arch must be 'swin' or 'resnet', got {arch!r}")
    state = backbone_state_dict(safe_load(src), src)
    converted, report = (convert_swin_authors(state) if arch == 'swin'
                         else convert_resnet_authors(state))
    out = collections.OrderedDict((prefix + k, v.contiguous()) for k, v in converted.items())
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'output folder {folder!r} does not exist')
    with atomic_write(dst) as tmp:
        torch.save(out, tmp)
    print(f'{src} -> {dst}: {len(out)} keys; renamed {len(report.converted)}, '
          f'dropped {len(report.dropped)}')
    return len(out)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        convert(args.src, args.dst, args.arch, args.prefix)
    except (FileNotFoundError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
