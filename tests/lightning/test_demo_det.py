"""tools/demo.py: the detection demo pipeline (data -> Lightning train -> test -> figures).

The quick test runs the whole pipeline on a tiny dataset for two training steps and checks what
it produces; the slow one is ``make demo`` itself and asserts its floor.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import matplotlib.image
import pytest

REPO = Path(__file__).resolve().parents[2]


def _demo_module():
    spec = importlib.util.spec_from_file_location('acmix_demo', REPO / 'tools/demo.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_det_pipeline_on_a_tiny_dataset_writes_metrics_and_figures(tmp_path):
    demo = _demo_module()
    data, work = tmp_path / 'data', tmp_path / 'work'
    result = demo.run_demo('det', work_dir=str(work), data_root=str(data), num_train=4,
                           num_val=2, max_steps=2, log=lambda _: None)
    # The data was generated where asked, with the sizes asked for.
    info = json.loads((data / 'dataset_info.json').read_text())
    assert (info['layout'], info['num_train'], info['num_val']) == ('coco', 4, 2)
    # Two steps cannot learn; the metrics exist and are COCO mAPs (or -1 with nothing matched).
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50'):
        assert -1.0 <= float(result.metrics[key]) <= 1.0
    assert result.floor_metric == 'coco/bbox_mAP' and result.floor == demo.TASKS['det'].floor
    assert result.passed == (float(result.metrics['coco/bbox_mAP']) >= result.floor)
    # Figures: two rows (two val images) of input + prediction, and the curves.
    preds = matplotlib.image.imread(result.predictions_png)
    curves = matplotlib.image.imread(result.curves_png)
    assert preds.shape[0] > 300 and preds.shape[1] > 300 and curves.shape[1] > 800
    assert sorted(p.name for p in (work / 'show').iterdir()) == ['000000.png', '000001.png']
    rows = demo.read_metrics_csv(str(work))
    assert any('train/loss' in r for r in rows)
    assert (work / 'checkpoints' / 'last.ckpt').is_file()
    saved = json.loads((work / 'demo_result.json').read_text())
    assert saved['metrics']['coco/bbox_mAP'] == result.metrics['coco/bbox_mAP']
    text = demo.summary('det', result)
    assert ('PASS' if result.passed else 'FAIL') in text and 'coco/segm_mAP' in text
    assert 'untrained' in text.splitlines()[1] and set(result.untrained) >= set(demo.TASKS['det'].report)
    # A second run finds the data and does not regenerate it.
    assert demo.ensure_data(demo.TASKS['det'], str(data), 4, 2) is False
    assert info['size'] == list(demo.TASKS['det'].data_kwargs['size'])


def test_demo_data_drawn_with_other_settings_is_drawn_again(tmp_path):
    demo = _demo_module()
    from acmix_mm.datasets.synthetic import generate_coco_shapes
    generate_coco_shapes(tmp_path, num_train=2, num_val=1, size=(64, 64))  # an earlier demo's data
    assert demo.ensure_data(demo.TASKS['det'], str(tmp_path), 2, 1) is True
    info = json.loads((tmp_path / 'dataset_info.json').read_text())
    wanted = demo.TASKS['det'].data_kwargs
    assert info['size'] == list(wanted['size']) and info['num_objects'] == list(wanted['num_objects'])
    assert demo.ensure_data(demo.TASKS['det'], str(tmp_path), 2, 1) is False


def test_demo_data_of_an_older_generator_is_drawn_again(tmp_path):
    demo = _demo_module()
    from acmix_mm.datasets.synthetic import DATA_VERSION
    task = demo.TASKS['seg']
    assert demo.ensure_data(task, str(tmp_path), 2, 1) is True
    info_path = tmp_path / 'dataset_info.json'
    info = json.loads(info_path.read_text())
    assert info['version'] == DATA_VERSION
    assert demo.ensure_data(task, str(tmp_path), 2, 1) is False
    # Data written before versions were recorded (v1: spikes were stars or triangles).
    del info['version']
    info_path.write_text(json.dumps(info))
    assert demo.ensure_data(task, str(tmp_path), 2, 1) is True
    assert json.loads(info_path.read_text())['version'] == DATA_VERSION


def test_curves_start_at_the_untrained_metrics(tmp_path, monkeypatch):
    demo = _demo_module()
    import matplotlib.axes
    drawn = {}
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, xs, ys, *args, label=None, **kwargs):
        drawn[label] = (list(xs), list(ys))
        return real_plot(self, xs, ys, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, 'plot', plot)
    rows = [dict(step=10.0, **{'train/loss': 1.5, 'train/lr': 1e-3}),
            dict(step=20.0, **{'train/loss': 1.0, 'train/lr': 5e-4}),
            dict(step=20.0, mIoU=41.5)]
    demo.plot_curves(rows, ['mIoU'], str(tmp_path / 'curves.png'), untrained={'mIoU': 3.25})
    assert drawn['mIoU'] == ([0.0, 20.0], [3.25, 41.5])
    assert drawn['loss'] == ([10.0, 20.0], [1.5, 1.0])
    assert matplotlib.image.imread(str(tmp_path / 'curves.png')).shape[1] == 900
    demo.plot_curves(rows, ['mIoU'], str(tmp_path / 'curves.png'))
    assert drawn['mIoU'] == ([20.0], [41.5])
    assert demo.running_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert demo.running_mean([2.0, 4.0], 5) == [2.0, 3.0]


def test_demo_refuses_a_foreign_data_folder(tmp_path):
    demo = _demo_module()
    (tmp_path / 'notes.txt').write_text('not a dataset')
    with pytest.raises(FileExistsError, match='dataset_info.json'):
        demo.ensure_data(demo.TASKS['det'], str(tmp_path), 4, 2)
    with pytest.raises(ValueError, match="'pose'"):
        demo.run_demo('pose')
    assert demo.main(['det', '--max-steps', '0']) == 2


def test_config_paths_follow_data_root():
    demo = _demo_module()
    cfg = demo.load_demo_config(demo.TASKS['det'], '/somewhere/shapes')
    assert cfg.train_dataloader.dataset.data_root == '/somewhere/shapes/'
    assert cfg.val_evaluator.ann_file == '/somewhere/shapes/annotations/instances_val.json'
    assert cfg.test_evaluator.ann_file == '/somewhere/shapes/annotations/instances_val.json'


@pytest.mark.slow
def test_make_demo_det_reaches_its_floor(tmp_path):
    demo = _demo_module()
    result = demo.run_demo('det', work_dir=str(tmp_path / 'work'))
    print(demo.summary('det', result))
    assert result.passed, demo.summary('det', result)
    assert float(result.metrics['coco/segm_mAP']) >= result.floor  # untrained: 0.000


def test_seg_pipeline_shares_the_code_path(tmp_path):
    demo = _demo_module()
    work = tmp_path / 'work'
    # 16 images: two batches of 8 per epoch (the config's batch size).
    result = demo.run_demo('seg', work_dir=str(work), data_root=str(tmp_path / 'data'),
                           num_train=16, num_val=2, max_steps=2, log=lambda _: None)
    assert 0.0 <= float(result.metrics['mIoU']) <= 100.0
    assert result.passed == (float(result.metrics['mIoU']) >= demo.TASKS['seg'].floor)
    # Rows of input, ground truth, prediction: three panels wide.
    preds = matplotlib.image.imread(result.predictions_png)
    assert preds.shape[1] > preds.shape[0] > 300
    assert sorted(p.name for p in (work / 'show').iterdir()) == [
        'ade_val_000000.png', 'ade_val_000001.png']
