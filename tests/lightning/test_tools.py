"""tools/train.py and tools/test.py end to end on a tiny Mask R-CNN and a tiny COCO set."""
import json
import re

import pytest
import torch
from mmengine.config import Config

from .conftest import run_tool


def test_checkpoint_loads_weights_only_and_into_plain_mmdet(trained, det_config_file):
    _, ckpt = trained
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert checkpoint['global_step'] == 2
    assert checkpoint['meta']['dataset_meta']['classes'] == ('square', 'bar')
    assert isinstance(checkpoint['hyper_parameters']['cfg'], dict)
    keys = list(checkpoint['state_dict'])
    assert 'backbone.conv1.weight' in keys and not any(k.startswith('model.') for k in keys)

    from mmdet.apis import init_detector
    from mmengine.runner import load_checkpoint
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(str(det_config_file))
    detector = init_detector(cfg, str(ckpt), device='cpu')
    for key, value in checkpoint['state_dict'].items():
        torch.testing.assert_close(detector.state_dict()[key], value, rtol=0, atol=0)
    assert detector.dataset_meta['classes'] == ('square', 'bar')

    init_default_scope('mmdet')
    plain = MODELS.build(cfg.model)
    load_checkpoint(plain, str(ckpt), map_location='cpu', strict=True)
    torch.testing.assert_close(plain.state_dict()['roi_head.bbox_head.fc_cls.weight'],
                               checkpoint['state_dict']['roi_head.bbox_head.fc_cls.weight'])


def _printed_metrics(stdout: str) -> dict:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^(coco/\S+)\s+(-?\d+\.\d+)$', stdout, re.M)}


def test_test_tool_metrics_equal_cocoeval_on_dumped_json(overfit_trained, overfit_config_file,
                                                         overfit_coco_root, tmp_path):
    # A model that memorised the val images: the compared numbers are far from 0, so a wrong
    # category mapping or wrong image ids in the dumped json would change them.
    _, ckpt = overfit_trained
    coco_root = overfit_coco_root
    prefix = tmp_path / 'pred' / 'results'
    proc = run_tool('tools/test.py', overfit_config_file, ckpt, '--out', prefix, '--work-dir', tmp_path / 'w',
                    '--show-dir', tmp_path / 'show', '--accelerator', 'cpu')
    printed = _printed_metrics(proc.stdout)
    assert len(printed) == 14, proc.stdout
    saved = json.loads(next((tmp_path / 'w').glob('metrics_*.json')).read_text())
    assert saved == pytest.approx(printed, abs=5e-4)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO(str(coco_root / 'annotations' / 'instances_val.json'))
    names = {'mAP': 0, 'mAP_50': 1, 'mAP_s': 3, 'mAP_m': 4, 'AR@100': 6, 'AR@300': 7, 'AR@1000': 8}
    for iou_type in ('bbox', 'segm'):
        results = json.loads((tmp_path / 'pred' / f'results.{iou_type}.json').read_text())
        assert {r['image_id'] for r in results} == {1, 2, 3, 4, 5}
        coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
        coco_eval.params.maxDets = [100, 300, 1000]  # as mmdet's CocoMetric (proposal_nums)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        for name, index in names.items():
            assert printed[f'coco/{iou_type}_{name}'] == pytest.approx(round(coco_eval.stats[index], 3), abs=1e-9)
        assert {r['category_id'] for r in results} <= {1, 2}
    # The -1 entries (no medium objects) show the evaluation ran on the real ground truth.
    assert printed['coco/bbox_mAP_m'] == -1.0 and printed['coco/bbox_mAP_s'] >= 0.0
    for iou_type in ('bbox', 'segm'):
        for name in ('mAP', 'mAP_50', 'AR@100'):
            assert printed[f'coco/{iou_type}_{name}'] > 0.1, (name, printed)
    drawings = sorted(p.name for p in (tmp_path / 'show').glob('*.png'))
    assert drawings == [f'val_{i:03d}.png' for i in range(5)]


def test_resume_continues_from_last_checkpoint(trained, det_config_file, tmp_path):
    import shutil
    work_dir, ckpt = trained
    resumed = tmp_path / 'resumed'
    shutil.copytree(work_dir, resumed)
    # Resumed with --retain-freed-memory (glibc keeps freed memory in the process).
    run_tool('tools/train.py', det_config_file, '--work-dir', resumed, '--resume', '--max-steps', '3',
             '--accelerator', 'cpu', '--retain-freed-memory', '--cfg-options', 'train_cfg.val_interval=3')
    after = torch.load(resumed / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    before = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert after['global_step'] == 3
    # The schedule kept counting from the checkpoint: one more iteration, one more scheduler step.
    assert after['mm_param_schedulers'][0]['_global_step'] == before['mm_param_schedulers'][0]['_global_step'] + 1
    changed = [k for k in before['state_dict'] if k.endswith('weight') and
               not torch.equal(before['state_dict'][k], after['state_dict'][k])]
    assert changed


def test_show_score_thr_filters_the_drawn_detections(overfit_trained, overfit_config_file,
                                                      overfit_coco_root, tmp_path):
    import mmcv
    import numpy as np

    from acmix_mm.lightning import load_config, test

    _, ckpt = overfit_trained
    drawn = {}
    for thr in (0.0, 1.0):
        show = tmp_path / f'show_{thr}'
        test(load_config(str(overfit_config_file)), ckpt, work_dir=str(tmp_path / 'w'), show_dir=str(show),
             show_score_thr=thr, accelerator='cpu', enable_progress_bar=False)
        drawn[thr] = mmcv.imread(str(show / 'val_000.png'), channel_order='rgb').astype(int)
    stored = next(p for p in overfit_coco_root.rglob('val_000.*') if p.suffix != '.json')
    image = mmcv.imread(str(stored), channel_order='rgb').astype(int)
    # At 1.0 no detection is drawn: the picture is the stored image; at 0.0 they all are.
    assert drawn[1.0].shape == image.shape and np.abs(drawn[1.0] - image).max() <= 1
    assert np.abs(drawn[0.0] - image).sum() > 1000
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match=r'show_score_thr must be a detection score in \[0, 1\]'):
            test(load_config(str(overfit_config_file)), ckpt, work_dir=str(tmp_path / 'bad'),
                 show_dir=str(tmp_path / 'bad_show'), show_score_thr=bad)
    with pytest.raises(ValueError, match='needs show_dir'):
        test(load_config(str(overfit_config_file)), ckpt, work_dir=str(tmp_path / 'bad'), show_score_thr=0.5)
    assert not (tmp_path / 'bad').exists() and not (tmp_path / 'bad_show').exists()
