"""Memory stays flat over many validation epochs in one process (tools/check_memory.py).

Detection (mmdet's CocoMetric, bbox + segm) runs 4 validation epochs in the default run;
the slow run adds 8 for detection, 4 and 8 for segmentation (mmseg's IoUMetric), and a fit with
a validation after each of 8 one-batch epochs on one Trainer, module and datamodule, so that one evaluator object scores
every epoch, as in a long training run. After every epoch: garbage collected, free heap pages
returned (malloc_trim), then the process RSS, the objects Python's garbage collector tracks,
and the results each metric still holds.

Bounds, from the end of epoch 2 to the end of the last epoch (epochs 1-2 fill caches):
* RSS grows by less than ``RSS_BOUND_MB`` (measured: docs/benchmarks.md; a few MB of
  allocator noise at most);
* gc-tracked objects grow by less than ``OBJECT_BOUND`` (measured: 6-20 per run);
* the metrics hold no result after any epoch (mmengine's BaseMetric.evaluate clears them).

The control test runs the same check with a metric whose ``evaluate`` does not reset its
results and shows that the check catches it: it can fail. (Such a metric would also score stale
results: on one process mmengine's ``collect_results`` keeps the first ``size`` results, i.e.
the first epoch's, every epoch.)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from mmengine.config import Config
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS

from acmix_mm.datasets.synthetic import generate_ade_scenes

from .helpers import tiny_maskrcnn_config

REPO = Path(__file__).resolve().parents[2]
SEG_DEMO_CONFIG = REPO / 'configs' / 'demo' / 'semfpn_acmix-r26-slim_shapes-ade.py'
EPOCHS = 8  # the slow runs
QUICK_EPOCHS = 4  # the default run: growth over epochs 3-4
RSS_BOUND_MB = 30.0
OBJECT_BOUND = 1000


def _load_tool():
    spec = importlib.util.spec_from_file_location('check_memory', REPO / 'tools' / 'check_memory.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_memory = _load_tool()


@METRICS.register_module(force=True)
class UnresetIoUMetric(IoUMetric):
    """mmseg's IoUMetric whose ``evaluate`` does not reset its results (the bug, for the control)."""

    def evaluate(self, size: int) -> dict:
        kept = list(self.results)
        metrics = super().evaluate(size)  # scores, then clears self.results
        self.results.extend(kept)
        return metrics


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    return generate_ade_scenes(tmp_path_factory.mktemp('ade_mem') / 'shapes', num_train=4, num_val=6,
                               size=(64, 64))


def seg_config(data_root: Path) -> Config:
    """The segmentation demo config on ``data_root`` with 64x64 images (6 val images, batch 2)."""
    cfg = Config.fromfile(str(SEG_DEMO_CONFIG))
    cfg.model.data_preprocessor.size = (48, 48)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = str(data_root)
        for step in cfg[key].dataset.pipeline:
            if step['type'] in ('Resize', 'RandomResize'):
                step['scale'] = (64, 64)
            if step['type'] == 'RandomCrop':
                step['crop_size'] = (48, 48)
    cfg.train_dataloader.batch_size = 2
    cfg.val_dataloader.batch_size = 2
    cfg.lightning = dict(enable_progress_bar=False, loggers=[])
    return cfg


def _assert_flat(rows, what: str, epochs: int) -> None:
    assert len(rows) == epochs
    summary = check_memory.summary(rows)
    print(what, {k: round(v, 2) for k, v in summary.items()})
    assert summary['pending_results_max'] == 0, f'{what}: a metric kept its results'
    assert summary['growth_mb'] < RSS_BOUND_MB, f'{what}: RSS grew {summary["growth_mb"]:.1f} MB'
    assert summary['gc_object_growth'] < OBJECT_BOUND, f'{what}: +{summary["gc_object_growth"]} gc objects'
    assert len({r.evaluator_id for r in rows}) == 1  # one evaluator scored every epoch
    assert all(r.metrics for r in rows)


@pytest.mark.parametrize('epochs', [QUICK_EPOCHS, pytest.param(EPOCHS, marks=pytest.mark.slow)])
def test_detection_validation_memory_is_flat(coco_root, epochs):
    cfg = tiny_maskrcnn_config(coco_root)
    rows = check_memory.check_memory(cfg, epochs=epochs, echo=False)
    _assert_flat(rows, 'CocoMetric', epochs)
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= rows[-1].metrics.keys()


@pytest.mark.slow  # IoUMetric's reset is checked in the default run by the control test below
@pytest.mark.parametrize('epochs', [QUICK_EPOCHS, EPOCHS])
def test_segmentation_validation_memory_is_flat(ade_root, epochs):
    rows = check_memory.check_memory(seg_config(ade_root), epochs=epochs, echo=False)
    _assert_flat(rows, 'IoUMetric', epochs)
    assert 'mIoU' in rows[-1].metrics


@pytest.mark.slow
def test_fit_with_validation_every_epoch_memory_is_flat(ade_root):
    # The training loop between validations: optimiser state is allocated in epoch 1, then flat.
    rows = check_memory.check_memory(seg_config(ade_root), epochs=EPOCHS, mode='fit', echo=False)
    _assert_flat(rows, 'IoUMetric, fit', EPOCHS)


def test_a_metric_that_keeps_its_results_is_caught(ade_root):
    cfg = seg_config(ade_root)
    cfg.val_evaluator = dict(type='UnresetIoUMetric', iou_metrics=['mIoU'])
    rows = check_memory.check_memory(cfg, epochs=4, val_batches=1, echo=False)
    # One batch (2 images) more after every epoch: the check the tests above pass catches it.
    assert [r.pending_results for r in rows] == [2, 4, 6, 8]
    assert check_memory.summary(rows)['pending_results_max'] == 8


@pytest.mark.parametrize('kwargs, match', [
    (dict(epochs=2), 'epochs must be an int > 2'),
    (dict(mode='train'), "mode='train'; allowed: validate, fit"),
    (dict(val_batches=0), 'val_batches must be an int >= 1'),
])
def test_bad_arguments(kwargs, match, ade_root):
    with pytest.raises(ValueError, match=match):
        check_memory.check_memory(seg_config(ade_root), **{'epochs': EPOCHS, **kwargs})


def test_config_without_validation_is_refused(ade_root):
    cfg = seg_config(ade_root)
    cfg.pop('val_evaluator')
    with pytest.raises(ValueError, match='no val_evaluator'):
        check_memory.check_memory(cfg, epochs=EPOCHS)
