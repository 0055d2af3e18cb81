#!/usr/bin/env python
"""The CPU demos: synthetic data -> train (Lightning) -> test -> figures, with a quality floor.

    python tools/demo.py det     (make demo)      Mask R-CNN on ResNet-ACMix, COCO-format shapes
    python tools/demo.py seg     (make demo-seg)  Semantic FPN on ResNet-ACMix, ADE20K-layout scenes

Each run:

1. writes the task's synthetic dataset into the config's ``data_root`` if it is not there yet
   (``acmix_mm.datasets.synthetic``; ``--data-root`` puts it elsewhere);
2. trains the config through the Lightning wrapper (``acmix_mm.lightning.train``), logging
   TensorBoard and CSV under ``WORK_DIR`` (default ``work_dirs/demo_<task>``);
3. tests the last checkpoint (``acmix_mm.lightning.test``), drawing every prediction;
4. writes ``WORK_DIR/demo_predictions.png`` (inputs, ground truth for seg, predictions) and
   ``WORK_DIR/demo_curves.png`` (training losses and validation metrics from ``metrics.csv``),
   and ``WORK_DIR/demo_result.json``;
5. prints the metrics against the task's floor: PASS (exit 0) or FAIL (exit 1).

Only the :data:`TASKS` table and the ground-truth drawing differ between ``det`` and ``seg``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from acmix_mm.checkpoint.atomic import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """What differs between the demos.

    Attributes:
        config: the demo config, relative to the repository.
        layout: the synthetic layout ('coco' or 'ade'), see tools/make_demo_data.py.
        num_train, num_val: images generated per split.
        floor_metric, floor: the run passes when ``metrics[floor_metric] >= floor``.
        report: metrics printed at the end (the floor metric first).
        val_image_glob: the validation images, relative to the data root (for the figure).
        gt_label_dir: for segmentation, the validation label folder (drawn beside predictions).
        data_kwargs: the generator's other arguments (image size, shapes per image, their sizes);
            a demo dataset on disk generated with other values is generated again.
        show_score_thr: detection only: the predictions picture draws detections scoring at
            least this (the metrics count every detection).
    """
    config: str
    layout: str
    num_train: int
    num_val: int
    floor_metric: str
    floor: float
    report: Sequence[str]
    val_image_glob: str
    gt_label_dir: Optional[str] = None
    data_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    show_score_thr: Optional[float] = None


# Floors: about half of what the demo reaches on 2 CPU cores and far above an untrained model
# (docs/benchmarks.md). det: untrained bbox/segm mAP 0.000/0.000; trained (AdamW lr 1e-3, half the
# sampled RoIs positive, 7x7 mask RoIs, 20 epochs of 100 steps of 4 images at 128 px) bbox mAP
# 0.549, segm 0.575. seg: untrained mIoU 8.5; trained (whole 128 px images, AdamW 4e-3, ACMix
# in stages 3-4, 1400 steps of 8 images) 63.3.
TASKS: Dict[str, DemoTask] = {
    'det': DemoTask(
        config='configs/demo/maskrcnn_acmix-r26-slim_shapes-coco.py', layout='coco',
        num_train=400, num_val=40, floor_metric='coco/bbox_mAP', floor=0.25,
        report=('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'),
        val_image_glob='images/val/*.png',
        data_kwargs=dict(size=(128, 128), num_objects=(1, 4), radius_range=(0.12, 0.35)),
        show_score_thr=0.5),
    'seg': DemoTask(
        config='configs/demo/semfpn_acmix-r26-slim_shapes-ade.py', layout='ade',
        num_train=200, num_val=40, floor_metric='mIoU', floor=30.0,
        report=('mIoU', 'mAcc', 'aAcc'),
        val_image_glob='images/validation/*.jpg', gt_label_dir='annotations/validation'),
}
NUM_SHOWN = 6  # validation images in the predictions figure


# -- configuration --------------------------------------------------------------------------------
def replace_prefix(node: Any, old: str, new: str) -> Any:
    """A copy of a config tree in which every string starting with ``old`` starts with ``new``.

    mmengine resolves ``data_root + '...'`` when it reads a config, so moving the data means
    rewriting every path derived from it (dataset roots, ``ann_file`` of ``CocoMetric``).
    """
    if isinstance(node, str):
        return new + node[len(old):] if node.startswith(old) else node
    if isinstance(node, Mapping):
        return type(node)({k: replace_prefix(v, old, new) for k, v in node.items()})
    if isinstance(node, (list, tuple)):
        return type(node)(replace_prefix(v, old, new) for v in node)
    return node


def load_demo_config(task: DemoTask, data_root: Optional[str]):
    """The task's config, with its data moved to ``data_root`` when given."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(REPO / task.config))
    old = str(cfg.get('data_root') or '')
    if not old:
        raise ValueError(f'{task.config} defines no data_root; the demo needs one')
    if data_root is not None:
        new = str(data_root).rstrip('/') + ('/' if old.endswith('/') else '')
        for key in list(cfg.keys()):
            cfg[key] = replace_prefix(cfg[key], old, new)
        cfg.data_root = new
    if not os.path.isabs(cfg.data_root):
        # Relative roots are relative to the repository, wherever the demo is started from.
        abs_root = str(REPO / cfg.data_root) + ('/' if cfg.data_root.endswith('/') else '')
        old = cfg.data_root
        for key in list(cfg.keys()):
            cfg[key] = replace_prefix(cfg[key], old, abs_root)
        cfg.data_root = abs_root
    return cfg


# -- data -------------------------------------------------------------------------------------------
def ensure_data(task: DemoTask, root: str, num_train: int, num_val: int, seed: int = 0) -> bool:
    """Write the task's dataset into ``root`` unless a dataset of that layout is already there.

    Returns:
        True when it generated the data.

    Raises:
        FileExistsError: ``root`` holds something that is not a dataset of this layout.
    """
    from acmix_mm.datasets import synthetic

    info = Path(root) / 'dataset_info.json'
    overwrite = False
    if info.is_file():
        written = json.loads(info.read_text())
        layout = written.get('layout')
        expected = {'coco': 'coco', 'ade': 'ade20k'}[task.layout]
        if layout != expected:
            raise FileExistsError(f'{root} holds a {layout!r} dataset; the {task.layout} demo '
                                  f'needs {expected!r} (pass --data-root elsewhere)')
        wanted = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in task.data_kwargs.items()}
        wanted['version'] = synthetic.DATA_VERSION
        if all(written.get(k) == v for k, v in wanted.items()):
            return False
        # Drawn with other settings, or by an older generator: draw it again.
        overwrite = True
    elif Path(root).exists() and any(Path(root).iterdir()):
        raise FileExistsError(f'{root} is not empty and is not a synthetic demo dataset (no '
                              'dataset_info.json); remove it or pass --data-root elsewhere')
    generate = {'coco': synthetic.generate_coco_shapes, 'ade': synthetic.generate_ade_scenes}
    generate[task.layout](root, num_train=num_train, num_val=num_val, seed=seed, overwrite=overwrite,
                          **task.data_kwargs)
    return True


# -- figures ----------------------------------------------------------------------------------------
def read_metrics_csv(work_dir: str) -> List[Dict[str, float]]:
    """Rows of the newest ``WORK_DIR/csv/version_*/metrics.csv`` (empty cells dropped)."""
    paths = sorted(glob.glob(os.path.join(work_dir, 'csv', 'version_*', 'metrics.csv')),
                   key=lambda p: int(Path(p).parent.name.split('_')[-1]))
    if not paths:
        raise FileNotFoundError(f'no csv/version_*/metrics.csv under {work_dir}: did training log?')
    with open(paths[-1], newline='') as f:
        return [{k: float(v) for k, v in row.items() if v not in ('', None)}
                for row in csv.DictReader(f)]


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """Mean of each value and the up to ``window - 1`` values before it."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(rows: List[Dict[str, float]], metric_keys: Sequence[str], path: str,
                untrained: Optional[Mapping[str, Any]] = None) -> None:
    """Training losses, learning rate and validation metrics, stacked on one training-step axis.

    ``untrained``: the metrics of the model before its first step, drawn at step 0.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def series(key: str, start: Optional[float] = None):
        pts = sorted((r['step'], r[key]) for r in rows if key in r and 'step' in r)
        if start is not None:
            pts.insert(0, (0.0, float(start)))
        return zip(*pts) if pts else ((), ())

    fig, (ax_loss, ax_lr, ax_metric) = plt.subplots(
        3, 1, figsize=(9, 8), sharex=True, gridspec_kw=dict(height_ratios=(3, 1, 2)))
    loss_keys = sorted({k for r in rows for k in r if k.startswith('train/loss')})
    for key in loss_keys:
        xs, ys = (list(v) for v in series(key))
        # Each logged value is one batch's: faint, under a running mean that shows the trend.
        (raw, ) = ax_loss.plot(xs, ys, lw=0.6, alpha=0.3)
        ax_loss.plot(xs, running_mean(ys, max(1, len(ys) // 15)), color=raw.get_color(),
                     label=key[len('train/'):], lw=2 if key == 'train/loss' else 1)
    ax_loss.set(ylabel='loss (log)', yscale='log',
                title='training (faint: logged batches; solid: their running mean)')
    ax_loss.legend(fontsize=7, ncol=2)
    xs, ys = series('train/lr')
    ax_lr.plot(xs, ys, color='tab:gray')
    ax_lr.set(ylabel='learning rate')
    ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    for key in metric_keys:
        xs, ys = series(key, (untrained or {}).get(key))
        ax_metric.plot(xs, ys, marker='o', label=key)
    ax_metric.set(xlabel='training step', ylabel='metric',
                  title='validation' + (' (step 0: the untrained model)' if untrained else ''))
    ax_metric.legend(fontsize=7)
    for ax in (ax_loss, ax_lr, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)


def _colour_labels(label_path: str, palette: Sequence[Sequence[int]]):
    """A stored ADE20K-layout label PNG (0 = other, k = class k - 1) as an RGB image."""
    import mmcv
    import numpy as np

    label = mmcv.imread(label_path, flag='unchanged')
    lut = np.zeros((256, 3), dtype=np.uint8)
    for k, colour in enumerate(palette):
        lut[k + 1] = colour
    return lut[label]


def plot_predictions(task: DemoTask, data_root: str, show_dir: str, path: str,
                     palette: Optional[Sequence[Sequence[int]]] = None,
                     classes: Optional[Sequence[str]] = None) -> int:
    """Rows of (input, [ground truth,] prediction) for the first validation images.

    With ``classes`` and ``palette`` (RGB 0-255, one per class) a legend of the class colours
    heads the figure; for segmentation it adds black, the ignored "other" label.

    Returns:
        The number of images drawn.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import mmcv
    from matplotlib.patches import Patch

    images = sorted(glob.glob(os.path.join(data_root, task.val_image_glob)))[:NUM_SHOWN]
    if not images:
        raise FileNotFoundError(f'no validation images {task.val_image_glob} under {data_root}')
    cols = 3 if task.gt_label_dir else 2
    fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.6 * len(images)),
                             squeeze=False)
    for row, image_path in zip(axes, images):
        stem = Path(image_path).stem
        panels = [('input', mmcv.imread(image_path, channel_order='rgb'))]
        if task.gt_label_dir:
            label = os.path.join(data_root, task.gt_label_dir, stem + '.png')
            panels.append(('ground truth', _colour_labels(label, palette or [])))
        drawn = os.path.join(show_dir, stem + '.png')
        if not os.path.isfile(drawn):
            raise FileNotFoundError(f'test drew no {drawn}')
        title = 'prediction'
        if task.show_score_thr is not None:
            title += f' (score >= {task.show_score_thr:g})'
        panels.append((title, mmcv.imread(drawn, channel_order='rgb')))
        for ax, (title, img) in zip(row, panels):
            ax.imshow(img)
            ax.set_title(f'{stem}: {title}', fontsize=7)
            ax.axis('off')
    legend_top = 1.0
    if classes and palette:
        handles = [Patch(facecolor=[c / 255 for c in colour], edgecolor='black', label=name)
                   for name, colour in zip(classes, palette)]
        if task.gt_label_dir:
            handles.append(Patch(facecolor='black', label='other (ignored)'))
        legend_top = 1 - 0.35 / fig.get_figheight()
        fig.legend(handles=handles, loc='upper center', ncol=len(handles), fontsize=7,
                   frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, legend_top))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)
    return len(images)


# -- the pipeline ---------------------------------------------------------------------------------
def evaluate_untrained(cfg, work_dir: str) -> Dict[str, Any]:
    """The val metrics of the config's model as training starts it (seeded the same way).

    The initialised weights are saved to ``WORK_DIR/untrained/untrained.ckpt`` and evaluated
    through ``acmix_mm.lightning.test`` like the trained ones; training seeds itself again, so
    this does not change the trained model.
    """
    import torch
    from lightning.pytorch import seed_everything

    from acmix_mm.lightning import MMLightningModule, test

    seed = (cfg.get('randomness') or {}).get('seed')
    if seed is not None:
        seed_everything(seed, workers=False, verbose=False)
    model = MMLightningModule(cfg.copy()).model
    folder = os.path.join(work_dir, 'untrained')
    path = os.path.join(folder, 'untrained.ckpt')
    with atomic_write(path) as tmp:
        torch.save({'state_dict': model.state_dict()}, tmp)
    return test(cfg.copy(), path, work_dir=folder, enable_progress_bar=False)


@dataclasses.dataclass
class DemoResult:
    metrics: Dict[str, Any]
    untrained: Dict[str, Any]
    floor_metric: str
    floor: float
    passed: bool
    predictions_png: str
    curves_png: str
    train_seconds: float
    test_seconds: float
    work_dir: str


def run_demo(task_name: str, work_dir: Optional[str] = None, data_root: Optional[str] = None,
             num_train: Optional[int] = None, num_val: Optional[int] = None,
             max_epochs: Optional[int] = None, max_steps: Optional[int] = None,
             floor: Optional[float] = None, log: Callable[[str], None] = print) -> DemoResult:
    """Data -> train -> test -> figures for one task of :data:`TASKS` (see module docstring).

    ``max_epochs``/``max_steps`` shorten training (quick checks); ``floor`` replaces the task's.
    """
    if task_name not in TASKS:
        raise ValueError(f'unknown demo {task_name!r}; allowed: {sorted(TASKS)}')
    task = TASKS[task_name]
    import acmix_mm  # noqa: F401  (registers the backbones and datasets)
    from acmix_mm.lightning import TrainerOverrides, test, train

    cfg = load_demo_config(task, data_root)
    root = cfg.data_root
    work_dir = os.path.abspath(work_dir or os.path.join(REPO, 'work_dirs', f'demo_{task_name}'))
    if ensure_data(task, root, num_train or task.num_train, num_val or task.num_val):
        log(f'[demo] wrote the {task.layout} dataset to {root}')
    else:
        log(f'[demo] using the dataset in {root}')

    log('[demo] evaluating the untrained model')
    untrained = evaluate_untrained(cfg, work_dir)
    overrides = TrainerOverrides(max_epochs=max_epochs, max_steps=max_steps)
    start = time.time()
    extra = {}
    if max_steps is not None:
        # A shortened run still logs (the config's interval may exceed it).
        extra['log_every_n_steps'] = max(1, min(max_steps, 10))
    # Each demo run starts over: an earlier run's checkpoints move to checkpoints.old-<time>.
    train(cfg.copy(), work_dir=work_dir, overrides=overrides, restart=True, enable_progress_bar=False,
          **extra)
    train_seconds = time.time() - start
    palette = cfg.get('metainfo', {}).get('palette')
    if task.gt_label_dir:
        from acmix_mm.datasets.synthetic import ADE_PALETTE
        palette = palette or ADE_PALETTE
        # mmseg's SegLocalVisualizer falls back to Cityscapes' names and colours; give it the
        # demo's, the same ones the ground-truth panel uses. mmseg 1.2.2's __init__ hands them
        # to set_dataset_meta(classes, palette) swapped, hence crosswise here. alpha=1: the
        # prediction in plain class colours, comparable with the ground truth at a glance.
        cfg.visualizer = dict(cfg.visualizer, palette=tuple(cfg.metainfo['classes']),
                              classes=[list(c) for c in palette], alpha=1.0)
    ckpt = os.path.join(work_dir, 'checkpoints', 'last.ckpt')
    show_dir = os.path.join(work_dir, 'show')
    start = time.time()
    metrics = test(cfg.copy(), ckpt, work_dir=work_dir, show_dir=show_dir,
                   show_score_thr=task.show_score_thr, enable_progress_bar=False)
    test_seconds = time.time() - start

    curves_png = os.path.join(work_dir, 'demo_curves.png')
    plot_curves(read_metrics_csv(work_dir), task.report, curves_png, untrained)
    predictions_png = os.path.join(work_dir, 'demo_predictions.png')
    plot_predictions(task, root, show_dir, predictions_png, palette,
                     cfg.get('metainfo', {}).get('classes'))

    floor = task.floor if floor is None else floor
    if task.floor_metric not in metrics:
        raise KeyError(f'the test metrics lack {task.floor_metric!r}; got {sorted(metrics)}')
    value = float(metrics[task.floor_metric])
    result = DemoResult(metrics=metrics, untrained=untrained, floor_metric=task.floor_metric, floor=floor,
                        passed=value >= floor, predictions_png=predictions_png,
                        curves_png=curves_png, train_seconds=train_seconds,
                        test_seconds=test_seconds, work_dir=work_dir)
    atomic_write_text(os.path.join(work_dir, 'demo_result.json'),
                      json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return result


def summary(task_name: str, result: DemoResult) -> str:
    """The lines printed at the end of a demo."""
    task = TASKS[task_name]
    lines = [f'[demo {task_name}] train {result.train_seconds:.0f} s, test {result.test_seconds:.0f} s',
             f'  {"metric":<18} {"untrained":>9} {"trained":>9}']
    for key in task.report:
        if key in result.metrics:
            before = result.untrained.get(key)
            before = f'{float(before):9.4f}' if before is not None else f'{"-":>9}'
            lines.append(f'  {key:<18} {before} {float(result.metrics[key]):9.4f}')
    verdict = 'PASS' if result.passed else 'FAIL'
    value = float(result.metrics[result.floor_metric])
    lines.append(f'{verdict}: {result.floor_metric} = {value:.4f} '
                 f'{">=" if result.passed else "<"} floor {result.floor}')
    lines.append(f'  predictions: {result.predictions_png}')
    lines.append(f'  curves:      {result.curves_png}')
    lines.append(f'  logs:        {result.work_dir} (tensorboard/, csv/), checkpoints/last.ckpt')
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('task', choices=sorted(TASKS), help='det: detection demo; seg: segmentation')
    p.add_argument('--work-dir', help='outputs (default work_dirs/demo_<task>)')
    p.add_argument('--data-root', help="dataset folder (default: the config's data_root)")
    p.add_argument('--num-train', type=int, help='training images to generate if data is missing')
    p.add_argument('--num-val', type=int, help='validation images to generate if data is missing')
    p.add_argument('--max-epochs', type=int, help='shorten training (quick checks)')
    p.add_argument('--max-steps', type=int, help='shorten training to this many steps')
    p.add_argument('--floor', type=float, help="replace the task's floor")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    for name in ('num_train', 'num_val', 'max_epochs', 'max_steps'):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f'demo: error: --{name.replace("_", "-")} must be >= 1, got {value}',
                  file=sys.stderr)
            return 2
    try:
        result = run_demo(args.task, args.work_dir, args.data_root, args.num_train, args.num_val,
                          args.max_epochs, args.max_steps, args.floor)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f'demo: error: {err}', file=sys.stderr)
        return 2
    print(summary(args.task, result))
    return 0 if result.passed else 1


if __name__ == '__main__':
    sys.exit(main())
