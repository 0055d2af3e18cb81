#!/usr/bin/env python
"""Write the synthetic demo datasets (acmix_mm.datasets.synthetic).

    python tools/make_demo_data.py coco --out data/demo/shapes-coco
    python tools/make_demo_data.py ade  --out data/demo/shapes-ade --num-train 300 --size 128 128
    python tools/make_demo_data.py all  --out data/demo        (-> data/demo/shapes-{coco,ade})

Same arguments, same bytes. A non-empty target is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from acmix_mm.datasets import synthetic

#: Folder names under --out for ``all``.
ALL_SUBDIRS = {'coco': 'shapes-coco', 'ade': 'shapes-ade'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('layout', choices=('coco', 'ade', 'all'),
                   help='coco: detection/instance shapes; ade: ADE20K-layout scenes; all: both')
    p.add_argument('--out', required=True, type=Path, help='target folder (parent folder for all)')
    p.add_argument('--num-train', type=int, default=200, help='training images (default 200)')
    p.add_argument('--num-val', type=int, default=40, help='validation images (default 40)')
    p.add_argument('--seed', type=int, default=0, help='base seed (default 0)')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), default=None,
                   help='image size in pixels (default: 256 256 for coco, 128 128 for ade)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty target')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = {'coco': synthetic.generate_coco_shapes, 'ade': synthetic.generate_ade_scenes}
    layouts = list(jobs) if args.layout == 'all' else [args.layout]
    for layout in layouts:
        out = args.out / ALL_SUBDIRS[layout] if args.layout == 'all' else args.out
        kwargs = dict(num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                      overwrite=args.overwrite)
        if args.size is not None:
            kwargs['size'] = tuple(args.size)
        try:
            path = jobs[layout](out, **kwargs)
        except (ValueError, FileExistsError, NotADirectoryError) as err:
            print(f'make_demo_data: error: {err}', file=sys.stderr)
            return 2
        print(f'{layout}: wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
