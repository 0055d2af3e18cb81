#!/usr/bin/env python
"""Draw a dataset's ground truth into PNGs (as mmdet's and mmseg's ``browse_dataset.py`` do).

    python tools/browse_dataset.py CONFIG [--split train|val|test] [--out DIR] [--num N]
        [--show-pipeline] [--data-root DIR] [--cfg-options KEY=VALUE ...]

    python tools/browse_dataset.py configs/demo/maskrcnn_acmix-r26-slim_shapes-coco.py --num 4
    python tools/browse_dataset.py configs/demo/semfpn_acmix-r26-slim_shapes-ade.py --split val \
        --data-root /tmp/shapes-ade --show-pipeline

``CONFIG`` is a path or ``mmdet::``/``mmseg::`` + a path in that package's configs. The tool
builds ``{split}_dataloader.dataset`` (default split: train) in the config's ``default_scope``
and draws the first ``N`` samples (default 10) through the config's ``visualizer`` (mmdet's
``DetLocalVisualizer``: boxes, instance masks and class names; mmseg's ``SegLocalVisualizer``:
label maps in the dataset's palette, blended with the visualiser's ``alpha``), with the
dataset's ``metainfo`` as the visualiser's ``dataset_meta``. It writes
``OUT/<split>/<image stem>.png`` (OUT default: ``work_dirs/browse/<config stem>``), each file
atomically, and prints one line per file and a final count.

What is drawn:

* default (raw): the image as stored and its annotations as the dataset lists them. Sample ``i``
  is ``dataset.get_data_info(i)`` run through the dataset's own ``Load*`` transforms (and the
  ``acmix_mm.Check*`` ones, which only validate) and its final ``Pack*`` transform, nothing
  else: no resize, flip or crop. Running mmdet's/mmseg's ``LoadAnnotations`` rather than
  re-reading the files here is what makes the labels the ones training sees: COCO polygons
  become masks, and ``reduce_zero_label``/``label_map`` are applied exactly as in the pipeline.
  The image is what ``LoadImageFromFile`` reads: the file's pixels, as ``mmcv.imread`` gives them.
* ``--show-pipeline``: ``dataset[i]``, the whole pipeline (e.g. Resize, RandomFlip, RandomCrop),
  so the PNG has the pipeline's output size and shows the augmented labels. Test pipelines load
  annotations after ``Resize`` (their metric compares at the original size); their boxes, masks
  and label maps are rescaled from ``ori_shape`` to the image for drawing.

Colours: mmcv loads images as BGR and ``PackDetInputs``/``PackSegInputs`` keep that order in
``inputs`` (CHW), so the tool flips it to RGB for the visualisers (they take and return RGB)
and back to BGR for ``cv2.imencode``: the PNG shows the image in its true colours.

``--data-root DIR`` moves the data: every config string that starts with the config's
``data_root`` (dataset roots, evaluator files) is rewritten, as ``tools/demo.py --data-root``
does. ``--cfg-options`` are merged after it.

The visualiser is built under a name of its own (mmengine visualisers are named singletons), with
no vis backends (nothing but the PNGs is written). For mmseg, ``classes``/``palette`` are taken
out of its config: mmseg 1.2.2's ``SegLocalVisualizer.__init__`` passes them to
``set_dataset_meta`` swapped, and the dataset's metainfo replaces them anyway.

Errors (a split the config lacks, a missing data folder or annotation file, a missing config)
print one line on stderr and exit with 2 before anything is written; argument errors (an unknown
``--split``, ``--num`` < 1) are argparse's: its usage line, the error, exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

SPLITS = ('train', 'val', 'test')
SCOPES = ('mmdet', 'mmseg')
DEFAULT_VISUALIZERS = {'mmdet': 'DetLocalVisualizer', 'mmseg': 'SegLocalVisualizer'}
#: Raw drawing keeps the pipeline's transforms whose class name starts with one of these.
RAW_TRANSFORM_PREFIXES = ('Load', 'Check')
_VISUALIZER_IDS = itertools.count()


class BrowseError(Exception):
    """A problem with the command line, the config or the data: one line, exit code 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file, or mmdet::/mmseg:: + a config of that package')
    parser.add_argument('--split', choices=SPLITS, default='train',
                        help='which {split}_dataloader.dataset to draw (default: train)')
    parser.add_argument('--out', help='output folder (default: work_dirs/browse/<config stem>); '
                                      'PNGs go to OUT/<split>/')
    parser.add_argument('--num', type=_positive_int, default=10,
                        help='draw the first N samples (default: 10)')
    parser.add_argument('--show-pipeline', action='store_true',
                        help="draw the pipeline's output (resized, flipped...) instead of the "
                             'stored image and annotations')
    parser.add_argument('--data-root', help="the data is in DIR: rewrite every path derived from "
                                            "the config's data_root")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config settings (merged after --data-root)')
    return parser.parse_args(argv)


# -- configuration --------------------------------------------------------------------------------
def _replace_prefix() -> Callable[[Any, str, str], Any]:
    """``tools/demo.py``'s ``replace_prefix`` (tools/ is not a package: load it by path)."""
    name = '_acmix_tools_demo'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name('demo.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before executing it: its dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name].replace_prefix


def load_config(name: str, data_root: Optional[str], cfg_options: Optional[Dict[str, Any]]):
    """The config, with its data moved to ``data_root`` when given, then ``cfg_options`` merged."""
    from acmix_mm.tool_models import load_tool_config

    cfg = load_tool_config(name)
    if data_root is not None:
        old = str(cfg.get('data_root') or '')
        if not old:
            raise BrowseError(f'{name} defines no data_root, so --data-root cannot move its data')
        new = str(data_root).rstrip('/') + ('/' if old.endswith('/') else '')
        replace_prefix = _replace_prefix()
        for key in list(cfg.keys()):
            cfg[key] = replace_prefix(cfg[key], old, new)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if cfg.get('default_scope') not in SCOPES:
        raise BrowseError(f"the config's default_scope must be 'mmdet' or 'mmseg', "
                          f"got {cfg.get('default_scope')!r}")
    return cfg


def dataset_config(cfg: Any, split: str) -> Any:
    """``cfg[f'{split}_dataloader'].dataset``, with its files checked."""
    from acmix_mm.datasets.paths import check_dataset_paths

    loader = cfg.get(f'{split}_dataloader')
    if not loader:
        raise BrowseError(f'the config has no {split}_dataloader')
    if not loader.get('dataset'):
        raise BrowseError(f'the config has no {split}_dataloader.dataset')
    check_dataset_paths(loader['dataset'], f'{split}_dataloader.dataset')
    return loader['dataset']


def build_visualizer(cfg: Any, metainfo: Dict[str, Any]):
    """The config's visualiser under a fresh name, writing nowhere, with the dataset's metainfo."""
    from mmengine.registry import VISUALIZERS

    scope = cfg.default_scope
    vis_cfg = copy.deepcopy(dict(cfg.get('visualizer') or dict(type=DEFAULT_VISUALIZERS[scope])))
    if scope == 'mmseg':
        for key in ('classes', 'palette', 'dataset_name'):  # passed swapped in mmseg 1.2.2
            vis_cfg.pop(key, None)
    vis_cfg.update(name=f'browse_dataset_{os.getpid()}_{next(_VISUALIZER_IDS)}',
                   vis_backends=None, save_dir=None)
    visualizer = VISUALIZERS.build(vis_cfg)
    visualizer.dataset_meta = dict(metainfo)
    return visualizer


# -- samples --------------------------------------------------------------------------------------
def raw_transforms(dataset: Any) -> Callable[[dict], Optional[dict]]:
    """The dataset's loading (and checking) transforms and its last ``Pack*`` transform."""
    from mmengine.dataset import Compose

    transforms = list(getattr(getattr(dataset, 'pipeline', None), 'transforms', None) or [])
    packs = [t for t in transforms if type(t).__name__.startswith('Pack')]
    if not packs or not hasattr(dataset, 'get_data_info'):
        raise BrowseError(f'{type(dataset).__name__} has no pipeline with a Pack* transform to '
                          'draw raw samples from; use --show-pipeline')
    keep = [t for t in transforms if type(t).__name__.startswith(RAW_TRANSFORM_PREFIXES)]
    return Compose(keep + packs[-1:])


def annotations_after_transforms(dataset: Any) -> bool:
    """Whether the pipeline loads annotations after transforming the image.

    mmdet's and mmseg's test pipelines do (``Resize``, then ``LoadAnnotations``): the evaluator
    compares at the original size, so the ground truth keeps ``ori_shape`` while the image has
    ``img_shape``.
    """
    names = [type(t).__name__ for t in getattr(getattr(dataset, 'pipeline', None), 'transforms', [])]
    first = next((i for i, n in enumerate(names) if n.startswith('Load') and 'Annotation' in n), None)
    return first is not None and any(not n.startswith(RAW_TRANSFORM_PREFIXES) for n in names[:first])


def align_ground_truth(sample: Any, height: int, width: int) -> None:
    """Rescale ground truth drawn at ``ori_shape`` to a ``height`` x ``width`` image, in place."""
    import mmcv
    import torch
    from mmengine.structures import PixelData

    ori_shape = sample.metainfo.get('ori_shape')
    if ori_shape is None or tuple(ori_shape[:2]) == (height, width):
        return
    ori_h, ori_w = ori_shape[:2]
    if 'gt_instances' in sample:
        instances = sample.gt_instances
        if 'bboxes' in instances:
            instances.bboxes = instances.bboxes * instances.bboxes.new_tensor(
                [width / ori_w, height / ori_h] * 2)
        if 'masks' in instances:
            instances.masks = instances.masks.resize((height, width))
    if 'gt_sem_seg' in sample:
        label = mmcv.imresize(sample.gt_sem_seg.data[0].numpy(), (width, height),
                              interpolation='nearest')
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None])


def to_rgb(inputs: Any) -> np.ndarray:
    """A packed ``inputs`` tensor (C x H x W, BGR as mmcv loads it) as an H x W x 3 RGB uint8 array."""
    image = inputs.permute(1, 2, 0).cpu().numpy()
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., 2::-1].clip(0, 255).astype(np.uint8))


def draw(visualizer: Any, item: Dict[str, Any], gt_at_original_size: bool = False) -> np.ndarray:
    """The sample's ground truth drawn on its image (RGB); ``gt_at_original_size``: see
    :func:`annotations_after_transforms`."""
    sample = item['data_samples'].cpu()
    image = to_rgb(item['inputs'])
    gt_instances = sample.get('gt_instances')
    if gt_instances is not None:
        if len(gt_instances) == 0:
            return image
        bboxes = gt_instances.get('bboxes')
        if bboxes is not None and hasattr(bboxes, 'tensor'):  # mmdet's HorizontalBoxes
            gt_instances.bboxes = bboxes.tensor
    elif 'gt_sem_seg' not in sample:
        return image
    if gt_at_original_size:
        align_ground_truth(sample, *image.shape[:2])
    visualizer.add_datasample('browse', image, sample, draw_gt=True, draw_pred=False, show=False)
    return visualizer.get_image()


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image as a PNG, atomically (cv2 encodes BGR)."""
    import cv2

    from acmix_mm.checkpoint.atomic import atomic_write_bytes

    ok, buf = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise OSError(f'could not encode {path}')
    atomic_write_bytes(path, buf.tobytes())


def browse(dataset: Any, visualizer: Any, out_dir: Path, num: int,
           raw: Optional[Callable[[dict], Optional[dict]]]) -> List[Path]:
    """Draw the first ``num`` samples into ``out_dir``: through ``raw`` (see
    :func:`raw_transforms`) from ``dataset.get_data_info(i)``, or ``dataset[i]`` when it is None."""
    late = raw is None and annotations_after_transforms(dataset)
    written = []
    for index in range(min(num, len(dataset))):
        item = dataset[index] if raw is None else raw(dataset.get_data_info(index))
        if item is None:
            print(f'sample {index}: the pipeline dropped it, skipped', file=sys.stderr)
            continue
        img_path = item['data_samples'].metainfo.get('img_path')
        path = out_dir / f'{Path(img_path).stem if img_path else f"{index:06d}"}.png'
        write_png(path, draw(visualizer, item, late))
        print(path)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:  # everything that can fail on the config or the data, before anything is written
        import acmix_mm  # noqa: F401  (registers acmix_mm's models, datasets and transforms)
        from acmix_mm.datasets.validation import build_dataset
        from mmengine.registry import init_default_scope

        cfg = load_config(args.config, args.data_root, args.cfg_options)
        dataset_cfg = dataset_config(cfg, args.split)
        init_default_scope(cfg.default_scope)
        dataset = build_dataset(dataset_cfg, f'{args.split}_dataloader.dataset')
        raw = None if args.show_pipeline else raw_transforms(dataset)
        visualizer = build_visualizer(cfg, dataset.metainfo)
    except (BrowseError, OSError, ValueError, KeyError) as exc:
        message = ' '.join(str(exc).split()) or type(exc).__name__
        print(f'browse_dataset.py: error: {message}', file=sys.stderr)
        return 2
    out = Path(args.out or Path('work_dirs', 'browse', Path(args.config.split('::')[-1]).stem))
    written = browse(dataset, visualizer, out / args.split, args.num, raw)
    print(f'wrote {len(written)} image(s) to {out / args.split}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
