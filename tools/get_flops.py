"""Parameters and FLOPs of a config's model, counting ACMix's attention (see acmix_mm.models.flops).

    .venv/bin/python tools/get_flops.py CONFIG [--shape H W] [--cfg-options KEY=VALUE ...]

FLOPs are multiply-accumulates (the fvcore/mmengine and ACMix-paper convention) of one forward
of backbone + neck + heads (no post-processing) on one H x W image. Default shape: the tools'
one default (``acmix_mm.tool_models.default_input_shape``): 800x1344 for mmdet configs, the
config's ``crop_size`` (else 512x512) for mmseg configs.
"""
from __future__ import annotations

import argparse
import sys

def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an mmdet or mmseg config file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input image size (default: 800 1344 for mmdet, the crop size for '
                             'mmseg)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in mmdet/mmseg tools')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from acmix_mm.models.flops import count_config_flops
    from acmix_mm.tool_models import default_input_shape, load_tool_config

    cfg = load_tool_config(args.config, args.cfg_options)
    height, width = args.shape if args.shape else default_input_shape(cfg)
    if height < 1 or width < 1:
        raise ValueError(f'--shape must be positive, got {height} {width}')
    report = count_config_flops(cfg, height, width)
    print(f'{args.config}  input 1x3x{height}x{width}')
    print(report.summary())
    return 0


if __name__ == '__main__':
    sys.exit(main())
