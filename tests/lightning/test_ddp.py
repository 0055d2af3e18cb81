"""Two-process CPU DDP (gloo): training and evaluation run, and evaluation equals one process's.

The val set has 5 images: a padding sampler would give each of the 2 ranks 3 images and score
one image twice; the unpadded sharding must score every image exactly once, in order.
"""
import csv
import json

import pytest
import torch

from .conftest import run_tool


def _results(prefix):
    return {t: json.loads(open(f'{prefix}.{t}.json').read()) for t in ('bbox', 'segm')}


@pytest.mark.slow  # about 1.5 min on 2 cores: three tool runs, two of them with 2 processes
def test_ddp_train_and_eval_equal_single_process(det_config_file, tmp_path):
    work = tmp_path / 'ddp'
    # SyncBN in the backbone: on CPU it cannot synchronise, so it must fall back to BN cleanly.
    run_tool('tools/train.py', det_config_file, '--work-dir', work, '--accelerator', 'cpu', '--devices', '2',
             '--strategy', 'ddp', '--cfg-options', 'model.backbone.norm_cfg.type=SyncBN')
    ckpt = work / 'checkpoints' / 'last.ckpt'
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert checkpoint['global_step'] == 2

    rows = list(csv.DictReader(open(next((work / 'csv').glob('version_*/metrics.csv')))))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith('coco/') and v}
    assert 'coco/bbox_AR@100' in logged

    # The same checkpoint evaluated by one process and by two.
    single, double = tmp_path / 'single' / 'res', tmp_path / 'double' / 'res'
    out1 = run_tool('tools/test.py', det_config_file, ckpt, '--out', single, '--work-dir', tmp_path / 'w1',
                    '--accelerator', 'cpu', '--cfg-options', 'model.backbone.norm_cfg.type=BN')
    run_tool('tools/test.py', det_config_file, ckpt, '--out', double, '--work-dir', tmp_path / 'w2',
             '--accelerator', 'cpu', '--devices', '2', '--strategy', 'ddp',
             '--cfg-options', 'model.backbone.norm_cfg.type=BN')
    metrics1 = json.loads(next((tmp_path / 'w1').glob('metrics_*.json')).read_text())
    metrics2 = json.loads(next((tmp_path / 'w2').glob('metrics_*.json')).read_text())
    assert metrics2 == metrics1
    # Validation inside DDP training scored the same weights the same way.
    assert {k: logged[k] for k in metrics1} == pytest.approx(metrics1, abs=1e-6)

    r1, r2 = _results(single), _results(double)
    for iou_type in ('bbox', 'segm'):
        assert len(r1[iou_type]) == len(r2[iou_type]) > 0
        assert sorted({r['image_id'] for r in r2[iou_type]}) == [1, 2, 3, 4, 5]
        for a, b in zip(r1[iou_type], r2[iou_type]):
            assert a['image_id'] == b['image_id'] and a['category_id'] == b['category_id']
            assert a['score'] == pytest.approx(b['score'], abs=1e-5)
            if iou_type == 'bbox':
                assert a['bbox'] == pytest.approx(b['bbox'], abs=1e-3)
    assert 'coco/bbox_mAP' in out1.stdout
