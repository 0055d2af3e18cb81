"""Prediction files and drawings for ``tools/test.py`` (``--out``, ``--show-dir``).

This is the one place where the wrapper knows metric types by name, because mmdet's and
mmseg's metrics write predictions in different ways:

* mmdet's ``CocoMetric`` writes the standard COCO results JSON that pycocotools reads when
  given ``outfile_prefix``: ``PREFIX.bbox.json`` (and ``PREFIX.segm.json`` for masks);
  ``--out PREFIX`` sets it. Scoring is unchanged.
* mmseg's ``IoUMetric`` writes one label PNG per image (named after the image's file stem, in
  the dataset's label convention: with ``reduce_zero_label``, as in ADE20K, class index + 1 and
  0 for "ignore") only with ``format_only=True``, in which case it scores nothing. ``--out DIR``
  therefore adds a second, ``format_only`` IoUMetric writing to ``DIR`` beside the scoring one.

Drawing goes through the config's ``visualizer`` (mmdet's ``DetLocalVisualizer``, mmseg's
``SegLocalVisualizer``), whose ``add_datasample`` has the same signature in both.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Dict, List, Mapping, Optional

from lightning.pytorch.callbacks import Callback
from mmengine.config import ConfigDict

from .config import iter_metric_cfgs

OUTPUT_METRICS = ('CocoMetric', 'IoUMetric')


def _bare_type(metric_cfg: Mapping[str, Any]) -> str:
    metric_type = metric_cfg.get('type')
    if not isinstance(metric_type, str):
        return getattr(metric_type, '__name__', repr(metric_type))
    return metric_type.split('.')[-1]


def redirect_outputs(evaluator_cfg: Any, out: str) -> List[ConfigDict]:
    """Metric configs of ``evaluator_cfg`` rewritten so that predictions are written at ``out``.

    Raises:
        ValueError: no metric of ``evaluator_cfg`` knows how to write predictions.
    """
    metrics = [ConfigDict(copy.deepcopy(dict(m))) for m in iter_metric_cfgs(evaluator_cfg)]
    if isinstance(evaluator_cfg, Mapping) and 'metrics' in evaluator_cfg and len(evaluator_cfg) > 1:
        raise ValueError('--out supports test_evaluator given as metrics, not an Evaluator with options')
    redirected: List[ConfigDict] = []
    written = False
    for metric in metrics:
        kind = _bare_type(metric)
        if kind == 'CocoMetric':
            metric['outfile_prefix'] = out
            written = True
        elif kind == 'IoUMetric' and not metric.get('format_only'):
            writer = copy.deepcopy(metric)
            writer.update(format_only=True, output_dir=out)
            redirected.append(writer)
            written = True
        redirected.append(metric)
    if not written:
        kinds = ', '.join(_bare_type(m) for m in metrics) or 'none'
        raise ValueError(f'--out: test_evaluator has metrics {kinds}; only {", ".join(OUTPUT_METRICS)} '
                         'write prediction files')
    # IoUMetric writes its PNGs during evaluation: the folder has to exist (CocoMetric's parent too).
    return redirected


def prepare_output_location(evaluator_cfg: Any, out: str) -> None:
    """Create what the redirected metrics write into (``out`` itself for IoUMetric, else its parent)."""
    kinds = {_bare_type(m) for m in iter_metric_cfgs(evaluator_cfg)}
    if 'IoUMetric' in kinds:
        os.makedirs(out, exist_ok=True)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)


class VisualizationCallback(Callback):
    """Draw every test prediction onto its image with the config's visualizer, as PNGs.

    Args:
        visualizer_cfg: ``cfg.visualizer`` (e.g. ``dict(type='DetLocalVisualizer')``).
        out_dir: the folder for ``<image stem>.png`` drawings.
        dataset_meta: classes and palette for the labels.
        score_thr: draw only detections scoring at least this (0..1); None keeps the
            visualizer's default (mmdet's ``DetLocalVisualizer``: 0.3). Detection visualizers only.

    Raises:
        ValueError: no visualizer, a ``score_thr`` outside [0, 1], or one for a visualizer that
            draws no scored detections (mmseg's draws every pixel).
    """

    def __init__(self, visualizer_cfg: Mapping[str, Any], out_dir: str, dataset_meta: Optional[dict] = None,
                 score_thr: Optional[float] = None):
        super().__init__()
        from mmengine.registry import VISUALIZERS

        if not visualizer_cfg:
            raise ValueError('--show-dir needs a visualizer in the config, e.g. '
                             "visualizer=dict(type='DetLocalVisualizer')")
        check_score_thr(score_thr)
        cfg = dict(copy.deepcopy(dict(visualizer_cfg)))
        # Headless: drawings go to out_file, no vis backends, a name of our own (visualizers
        # are named singletons in mmengine).
        cfg.update(vis_backends=None, save_dir=None, name=f'acmix_mm_show_{id(self)}')
        self.visualizer = VISUALIZERS.build(ConfigDict(cfg))
        self.draw_kwargs: Dict[str, Any] = {}
        if score_thr is not None:
            params = inspect.signature(self.visualizer.add_datasample).parameters
            if 'pred_score_thr' not in params:
                raise ValueError(f'show_score_thr={score_thr} applies to detection visualizers '
                                 f'(DetLocalVisualizer); {type(self.visualizer).__name__} draws '
                                 'no scored detections')
            self.draw_kwargs['pred_score_thr'] = float(score_thr)
        if dataset_meta:
            self.visualizer.dataset_meta = dataset_meta
        self.out_dir = out_dir

    def on_test_start(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        datamodule = getattr(trainer, 'datamodule', None)
        if not getattr(self.visualizer, 'dataset_meta', None) and datamodule is not None:
            self.visualizer.dataset_meta = datamodule.dataset_meta()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import mmcv

        for sample in outputs:
            path = sample.metainfo.get('img_path')
            if path is None:
                raise ValueError('--show-dir needs img_path in the data samples\' metainfo')
            image = mmcv.imread(path, channel_order='rgb')
            stem = os.path.splitext(os.path.basename(path))[0]
            self.visualizer.add_datasample(stem, image, data_sample=sample, draw_gt=False, show=False,
                                           out_file=os.path.join(self.out_dir, f'{stem}.png'),
                                           **self.draw_kwargs)


def check_score_thr(score_thr: Optional[float]) -> None:
    """Raise ValueError unless ``score_thr`` is None or a number in [0, 1]."""
    if score_thr is None:
        return
    if (isinstance(score_thr, bool) or not isinstance(score_thr, (int, float))
            or not 0.0 <= score_thr <= 1.0):
        raise ValueError(f'show_score_thr must be a detection score in [0, 1], got {score_thr!r}')


def format_metrics(metrics: Dict[str, Any]) -> str:
    """A two-column text table of ``metrics``."""
    if not metrics:
        return '(no metrics)'
    width = max(len(k) for k in metrics)
    lines = [f'{"metric".ljust(width)}  value', f'{"-" * width}  -----']
    for key, value in metrics.items():
        text = f'{value:.4f}' if isinstance(value, float) else str(value)
        lines.append(f'{key.ljust(width)}  {text}')
    return '\n'.join(lines)
