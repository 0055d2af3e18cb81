#!/usr/bin/env python
"""Train an mmdet/mmseg model from an mmengine config with Lightning (see acmix_mm.lightning)."""
import argparse

from mmengine.config import DictAction

import acmix_mm  # noqa: F401  (registers the ACMix models)
from acmix_mm.lightning import TrainerOverrides, load_config, train
from acmix_mm.lightning.api import AUTO_RESUME
from acmix_mm.utils.allocator import retain_freed_memory


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='mmengine config file')
    parser.add_argument('--work-dir', help='checkpoints and logs (default: cfg.work_dir or work_dirs/<config>)')
    start = parser.add_mutually_exclusive_group()
    start.add_argument('--resume', nargs='?', const=AUTO_RESUME, default=None, metavar='CKPT',
                        help="resume from CKPT; with no value, from the newest whole checkpoint in "
                             "WORK_DIR/checkpoints (normally last.ckpt). The run continues as if never "
                             "stopped: mid-epoch position, schedules and random states come from the checkpoint")
    start.add_argument('--restart', action='store_true',
                       help='start a new run in a work dir that holds an earlier run\'s checkpoints: '
                            'WORK_DIR/checkpoints is moved to checkpoints.old-<time> first (nothing is deleted)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_dataloader.batch_size=4')
    parser.add_argument('--accelerator', help="'cpu', 'gpu', 'auto' (default: config or auto)")
    parser.add_argument('--devices', type=int, help='devices per node')
    parser.add_argument('--num-nodes', type=int, help='number of nodes')
    parser.add_argument('--strategy', help="e.g. 'ddp'")
    parser.add_argument('--precision', choices=['16-mixed', 'bf16-mixed', '32', '32-true'])
    limits = parser.add_mutually_exclusive_group()
    limits.add_argument('--max-epochs', type=int, help='train this many epochs (epoch-based loop)')
    limits.add_argument('--max-steps', type=int, help='train this many iterations (iteration-based loop)')
    parser.add_argument('--seed', type=int, help='global seed (default: cfg.randomness.seed)')
    parser.add_argument('--retain-freed-memory', action='store_true',
                        help='CPU training: glibc keeps freed memory in the process, so large '
                             'tensors are not page-faulted in anew every step (faster; resident '
                             'memory stays at its peak). See acmix_mm.utils.allocator')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.retain_freed_memory and not retain_freed_memory():
        raise SystemExit('--retain-freed-memory needs glibc (Linux); this process has another C '
                         'library, nothing was changed')
    cfg = load_config(args.config, args.cfg_options)
    overrides = TrainerOverrides(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                                 strategy=args.strategy, precision=args.precision,
                                 max_epochs=args.max_epochs, max_steps=args.max_steps)
    train(cfg, work_dir=args.work_dir, resume=args.resume, overrides=overrides, seed=args.seed,
          restart=args.restart)


if __name__ == '__main__':
    main()
