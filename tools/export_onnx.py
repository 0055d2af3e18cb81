"""Export an ACMix config's backbone or tensor-mode model to ONNX; optional onnxruntime check.

    .venv/bin/python tools/export_onnx.py CONFIG [CKPT] --part backbone|model [--shape H W]
        [--batch B] [--dynamic-batch] [--out FILE] [--opset N] [--exporter torchscript|dynamo]
        [--check] [--seed S] [--cfg-options KEY=VALUE ...]

- ``--part backbone``: outputs ``feat0..`` = the backbone's ``out_indices`` feature maps.
- ``--part model``: ``model(x, mode='tensor')`` = backbone + neck + head without
  post-processing, for mmdet single-stage detectors (RetinaNet: ``cls_score.<level>``,
  ``bbox_pred.<level>``) and mmseg encoder-decoders (``seg_logits``). Two-stage detectors
  (Mask R-CNN) are refused with the reason (their RPN proposal selection does not trace).
- The input is a *preprocessed* (B, 3, H, W) float32 batch (mean/std from the config's
  data_preprocessor, recorded in the file's metadata). The file accepts exactly that H x W
  (fixed-size export: see acmix_mm/export.py), and that B unless ``--dynamic-batch``; default
  size 800x1344 (mmdet) or the crop size (mmseg).
- Without CKPT the weights are randomly initialised (seeded) and the tool says so. CKPT is read
  with torch.load(weights_only=True): a Lightning/mmengine checkpoint of the whole model, or
  (with --part backbone) a backbone state dict.
- ``--check`` runs the file on onnxruntime (CPU) on a seeded input and compares it with PyTorch
  (eval mode, the default ACMix attention path): exit 1, and no file written, when an output
  differs by more than 1e-4 (relative to max(1, its largest magnitude)).

The file is written atomically (a temporary file renamed at the end). Exit status: 0 written
(and checked), 1 parity check failed, 2 bad arguments or a failed export.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path



def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    from acmix_mm.export import DEFAULT_OPSET, EXPORTERS, OPSET_RANGE, PARTS

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an mmdet or mmseg config file')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='weights (weights_only); omitted: random init, seeded')
    parser.add_argument('--part', required=True, choices=PARTS,
                        help='backbone: the feature maps; model: the tensor-mode forward')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size in pixels (default: 800 1344 for mmdet, the crop size '
                             'for mmseg); the file accepts exactly this size')
    parser.add_argument('--batch', type=int, default=1, help='batch size of the export (1)')
    parser.add_argument('--dynamic-batch', action='store_true',
                        help='any batch size (H, W stay fixed); torchscript exporter only')
    parser.add_argument('--out', help='output .onnx file (default: work_dirs/onnx/'
                                      '<config>_<part>_<H>x<W>.onnx)')
    parser.add_argument('--opset', type=int, default=None,
                        help='ONNX opset: ' + '; '.join(
                            f'{e} {OPSET_RANGE[e][0]}..{OPSET_RANGE[e][1]} (default '
                            f'{DEFAULT_OPSET[e]})' for e in EXPORTERS))
    parser.add_argument('--exporter', default='torchscript', choices=EXPORTERS,
                        help='torchscript (default, fast to export) or dynamo (torch.export: '
                             'smaller graph, minutes to export)')
    parser.add_argument('--check', action='store_true',
                        help='compare onnxruntime with PyTorch; exit 1 above 1e-4')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the random init (no CKPT) and the check input (0)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in mmdet/mmseg tools')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from acmix_mm.export import (DEFAULT_OPSET, TOLERANCE, ExportError, build_export_target,
                                 check_opset, check_shape, compare_outputs,
                                 export_onnx, run_onnxruntime)
    from acmix_mm.tool_models import default_input_shape, load_tool_config

    failure: dict = {}  # set by the parity check: exit 1 instead of 2
    try:
        config = Path(args.config)
        if not config.is_file():
            raise ExportError(f'config file not found: {config}')
        if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
            raise ExportError(f'checkpoint file not found: {args.checkpoint}')
        opset = DEFAULT_OPSET[args.exporter] if args.opset is None else args.opset
        check_opset(opset, args.exporter)
        cfg = load_tool_config(str(config), args.cfg_options)
        height, width = check_shape(args.shape if args.shape else default_input_shape(cfg))
        out = args.out or os.path.join(
            'work_dirs', 'onnx', f'{config.stem}_{args.part}_{height}x{width}.onnx')
        if not out.endswith('.onnx'):
            raise ExportError(f'--out must name a .onnx file, got {out!r}')

        if args.dynamic_batch and args.exporter != 'torchscript':
            raise ExportError('--dynamic-batch works with --exporter torchscript only, got '
                              f'--exporter {args.exporter}')
        target = build_export_target(cfg, args.part, args.checkpoint, (height, width),
                                     batch=args.batch, seed=args.seed,
                                     dynamic_batch=args.dynamic_batch)
        print(target.weights)
        with torch.no_grad():
            reference = target.module(target.inputs)  # default attention path, eval mode
        verify = None
        if args.check:
            def verify(tmp_path: str) -> None:
                start = time.perf_counter()
                got = run_onnxruntime(tmp_path, target.inputs)
                report = compare_outputs(target.output_names, reference, got)
                print(f'onnxruntime {__import__("onnxruntime").__version__} (CPU) vs PyTorch '
                      f'(eval, default attention path), {time.perf_counter() - start:.1f} s:')
                print(report.summary())
                if not report.passed(TOLERANCE):
                    failure['report'] = report
                    raise ExportError(f'parity check FAILED: difference {report.worst_rel:.3e} '
                                      f'> {TOLERANCE:g}; {out} not written')
                print(f'parity check PASSED (<= {TOLERANCE:g})')

        start = time.perf_counter()
        n_acmix, opset = export_onnx(target.module, target.inputs, out, target.output_names,
                                     opset=opset, metadata=target.metadata, verify=verify,
                                     exporter=args.exporter, dynamic_batch=args.dynamic_batch)
    except ExportError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1 if failure else 2
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f'error: {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    batch = target.inputs.shape[0]
    via = (f"; {n_acmix} ACMix layers exported through the 'unfold' attention path"
           if n_acmix else '')
    print(f'wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB, {args.exporter} exporter, '
          f'opset {opset}, '
          f'{time.perf_counter() - start:.1f} s{via})')
    size = 'FIXED H x W' if args.dynamic_batch else 'FIXED size'
    print(f'input  "input" ({"batch" if args.dynamic_batch else batch}, 3, {height}, {width}) '
          f'float32, preprocessed (mean/std in the metadata); {size}: export again for '
          f'another size')
    for name, tensor in zip(target.output_names, reference):
        print(f'output "{name}" {tuple(tensor.shape)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
