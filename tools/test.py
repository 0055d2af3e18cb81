#!/usr/bin/env python
"""Evaluate a checkpoint on a config's test set; prints the metrics (see acmix_mm.lightning)."""
import argparse

from mmengine.config import DictAction

import acmix_mm  # noqa: F401  (registers the ACMix models)
from acmix_mm.lightning import TrainerOverrides, load_config, test


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='mmengine config file')
    parser.add_argument('checkpoint', help='checkpoint (tools/train.py, or an mmengine/mmdet/mmseg one); read '
                                           'safely: nothing in the file runs, and a truncated, corrupt, unsafe or '
                                           'foreign file fails before anything is built, naming the file')
    parser.add_argument('--out', help='predictions: COCO results JSON prefix (OUT.bbox.json, OUT.segm.json) '
                                      'for CocoMetric; a folder of label PNGs for IoUMetric')
    parser.add_argument('--show-dir', help='draw predictions on the images into this folder')
    parser.add_argument('--show-score-thr', type=float, metavar='THR',
                        help="with --show-dir: draw detections scoring >= THR (0..1; default: the "
                             "visualizer's, 0.3 for mmdet's)")
    parser.add_argument('--work-dir', help='metrics JSON goes here (default: cfg.work_dir or work_dirs/<config>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries')
    parser.add_argument('--accelerator', help="'cpu', 'gpu', 'auto'")
    parser.add_argument('--devices', type=int, help='devices per node')
    parser.add_argument('--strategy', help="e.g. 'ddp'")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    overrides = TrainerOverrides(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy)
    test(cfg, args.checkpoint, work_dir=args.work_dir, out=args.out, show_dir=args.show_dir,
         show_score_thr=args.show_score_thr, overrides=overrides)


if __name__ == '__main__':
    main()
