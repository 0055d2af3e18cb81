#!/usr/bin/env python
"""Time the start-up image check: one folder listing against opening every file.

    python tools/benchmark_data_checks.py                      (118,287 stand-in files, COCO train2017's count)
    python tools/benchmark_data_checks.py --folder data/coco/train2017      (a real image folder)

The data checks find missing images at start-up from a listing of each image folder
(``acmix_mm.datasets.image_files.missing_files``) and leave the file contents to the loader. This
prints what that listing costs and what reading each file's first 16 bytes (the earlier start-up
check) would cost, on the same files. As root on Linux the page cache is dropped before each
timing; otherwise the second pass may be served from memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List

from acmix_mm.datasets.image_files import missing_files

COCO_TRAIN_IMAGES = 118287


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--folder', help='an existing image folder (default: a temporary folder of stand-in files)')
    p.add_argument('--num-files', type=int, default=COCO_TRAIN_IMAGES,
                   help=f'stand-in files to write when no --folder is given (default {COCO_TRAIN_IMAGES})')
    args = p.parse_args(argv)
    if args.num_files < 1:
        p.error(f'--num-files must be >= 1, got {args.num_files}')
    if args.folder is not None and not os.path.isdir(args.folder):
        p.error(f'--folder {args.folder!r} is not a directory')
    return args


def _drop_page_cache() -> bool:
    try:
        os.sync()
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
        return True
    except OSError:
        return False


def _time_checks(paths: List[str]) -> None:
    dropped = _drop_page_cache()
    start = time.perf_counter()
    missing = missing_files(paths)
    listing = time.perf_counter() - start
    _drop_page_cache()
    start = time.perf_counter()
    for path in paths:
        with open(path, 'rb') as f:
            f.read(16)
    reading = time.perf_counter() - start
    cache = 'page cache dropped before each' if dropped else 'page cache not dropped (not root)'
    print(f'{len(paths):,} files ({cache}):')
    print(f'  folder listing (start-up check):      {listing:8.2f} s   {len(missing)} missing')
    print(f'  open + read 16 bytes of every file:   {reading:8.2f} s')


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.folder is not None:
        paths = sorted(e.path for e in os.scandir(args.folder) if e.is_file())
        if not paths:
            print(f'benchmark_data_checks: error: no files in {args.folder!r}', file=sys.stderr)
            return 2
        _time_checks(paths)
        return 0
    with tempfile.TemporaryDirectory(prefix='acmix_mm_data_checks_') as folder:
        paths = [os.path.join(folder, f'{i:012d}.jpg') for i in range(args.num_files)]
        for path in paths:
            with open(path, 'wb') as f:
                f.write(b'\xff\xd8\xff\xe0' + bytes(12))  # a JPEG signature
        _time_checks(paths)
    return 0


if __name__ == '__main__':
    sys.exit(main())
