"""tools/benchmark.py: every mode runs real models through the CLI's main(argv) and prints a
table whose numbers are finite, positive and consistent (ratio = time A / time B as printed).

Tiny images keep it quick: the CPU demo configs (slim ResNet-ACMix-26) and the stock mmdet/mmseg
ResNet-50 configs run at 64x64 to 96x96 with one or two iterations.
"""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DET_DEMO = str(REPO / 'configs/demo/maskrcnn_acmix-r26-slim_shapes-coco.py')
SEG_DEMO = str(REPO / 'configs/demo/semfpn_acmix-r26-slim_shapes-ade.py')
R50_MASK_RCNN = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
R50_SEM_FPN = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
R50_ACMIX_C3_C5 = str(REPO / 'configs/acmix_layer/mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py')
ROW = re.compile(r'^\| (A|B) \| (\S+) \| (\w+) \| ([^|]+) \| ([^|]+) \| ([^|]*) \|$')
RATIO = re.compile(r'^\| A / B \| \| \| ([^|]+) \| ([^|]+) \| \|$')


def load_tool():
    spec = importlib.util.spec_from_file_location('benchmark_tool', REPO / 'tools/benchmark.py')
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    return tool


tool = load_tool()


def run_cli(capsys, *argv: str) -> tuple[dict, dict, str]:
    """Run main(argv); returns (its result, the parsed table rows, the printed text)."""
    result = tool.main(list(argv) + ['--threads', '2'])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = dict(config=match.group(2), backbone=match.group(3),
                                        time_ms=float(match.group(4)),
                                        peak_mb=float(match.group(5)), notes=match.group(6))
        match = RATIO.match(line)
        if match:
            rows['A / B'] = dict(time=match.group(1).strip(), memory=match.group(2).strip())
    return result, rows, out


def check_row(row: dict, result: dict) -> None:
    assert math.isfinite(row['time_ms']) and row['time_ms'] > 0
    assert math.isfinite(row['peak_mb']) and row['peak_mb'] >= 0
    # The printed numbers are the returned ones, rounded to 0.1.
    assert abs(row['time_ms'] - result['time_ms']) <= 0.051
    assert abs(row['peak_mb'] - result['peak_mb']) <= 0.051


def check_ratio(rows: dict) -> None:
    a, b = rows['A'], rows['B']
    ratio = float(rows['A / B']['time'])
    # Three decimals of a ratio of values printed to 0.1 ms.
    tolerance = 0.0006 + ratio * (0.05 / a['time_ms'] + 0.05 / b['time_ms'])
    assert abs(ratio - a['time_ms'] / b['time_ms']) <= tolerance
    if b['peak_mb'] > 0.1:
        mem_ratio = float(rows['A / B']['memory'])
        tolerance = 0.0006 + mem_ratio * (0.05 / max(a['peak_mb'], 0.05) + 0.05 / b['peak_mb'])
        assert abs(mem_ratio - a['peak_mb'] / b['peak_mb']) <= tolerance


def test_backbone_train_vs_mmdet_resnet50(capsys):
    result, rows, out = run_cli(capsys, DET_DEMO, '--vs', R50_MASK_RCNN, '--part', 'backbone',
                                '--mode', 'train', '--shape', '64', '64', '--warmup', '0',
                                '--iters', '1')
    assert set(rows) == {'A', 'B', 'A / B'}
    assert rows['A']['backbone'] == 'ResNetACMix' and rows['B']['backbone'] == 'ResNet'
    assert rows['B']['config'] == R50_MASK_RCNN
    assert 'Pretrained init dropped' in rows['B']['notes']  # torchvision://resnet50 not fetched
    for label in 'AB':
        check_row(rows[label], result[label])
    # fwd+bwd of the full-width ResNet-50 allocates its 23.5 M gradients (94 MB) every iteration.
    assert rows['B']['peak_mb'] > 50
    check_ratio(rows)
    pairs = re.search(r'time A / B per alternated pair: ([\d.]+) \(median ([\d.]+)\)', out)
    assert pairs and pairs.group(1) == pairs.group(2)  # one iteration: one pair
    assert abs(float(pairs.group(1)) - result['A']['time_ms'] / result['B']['time_ms']) < 6e-4
    assert 'mode train (forward + backward), part backbone' in out
    assert 'input 1x3x64x64' in out


def test_stock_resnet_with_acmix_c3_c5_vs_resnet50(capsys):
    """The acmix_layer config against its own base: both backbones are mmdet's ResNet."""
    result, rows, out = run_cli(capsys, R50_ACMIX_C3_C5, '--vs', R50_MASK_RCNN, '--part',
                                'backbone', '--mode', 'train', '--shape', '64', '64',
                                '--warmup', '0', '--iters', '1')
    assert set(rows) == {'A', 'B', 'A / B'}
    assert rows['A']['backbone'] == rows['B']['backbone'] == 'ResNet'
    for label in 'AB':
        check_row(rows[label], result[label])
        assert 'Pretrained init dropped' in rows[label]['notes']
    check_ratio(rows)


def test_model_train_with_masks_and_attn_impl(capsys):
    result, rows, out = run_cli(capsys, DET_DEMO, '--part', 'model', '--mode', 'train',
                                '--shape', '96', '96', '--warmup', '0', '--iters', '1',
                                '--attn-impl', 'unfold')
    assert set(rows) == {'A'}
    check_row(rows['A'], result['A'])
    # acmix_stages=(False, False, True, True) of depth 26: 4 + 1 bottlenecks with ACMix.
    assert 'attn_impl=unfold on 5 ACMix layers' in rows['A']['notes']
    assert 'part model' in out and 'input 1x3x96x96' in out


def test_seg_model_infer_vs_mmseg_baseline(capsys):
    result, rows, out = run_cli(capsys, SEG_DEMO, '--vs', R50_SEM_FPN, '--mode', 'infer',
                                '--shape', '64', '96', '--warmup', '1', '--iters', '1')
    assert set(rows) == {'A', 'B', 'A / B'}
    assert rows['B']['backbone'] == 'ResNetV1c'
    for label in 'AB':
        check_row(rows[label], result[label])
    check_ratio(rows)
    assert 'mode infer (no-grad forward), part model' in out


def test_backbone_infer_channels_last(capsys):
    result, rows, out = run_cli(capsys, DET_DEMO, '--part', 'backbone', '--mode', 'infer',
                                '--shape', '64', '80', '--warmup', '0', '--iters', '2',
                                '--channels-last', '--batch', '2')
    check_row(rows['A'], result['A'])
    # mmdet's preprocessor pads to multiples of 32: 64x80 -> 64x96.
    assert 'channels_last' in out and 'input 2x3x64x96' in out
    # Without --attn-impl the table says which kernel the config's layers use.
    assert re.search(r'ACMix attn_impl \w+ x5', rows['A']['notes'])


def test_dataset_batch_through_the_train_pipeline(capsys, tmp_path):
    from acmix_mm.datasets.synthetic import generate_coco_shapes
    root = generate_coco_shapes(tmp_path / 'shapes', num_train=2, num_val=1, size=(80, 80))
    result, rows, out = run_cli(
        capsys, DET_DEMO, '--data', 'dataset', '--shape', '64', '96', '--warmup', '0',
        '--iters', '1', '--batch', '2',
        '--cfg-options', f'train_dataloader.dataset.data_root={root}')
    check_row(rows['A'], result['A'])
    # The pipeline's 256-px resize, then the forced 64x96 one; mmdet pads to 32: 64x96.
    assert 'data dataset' in out and 'input 2x3x64x96' in out


def test_without_pretrained_and_set_attn_impl():
    cfg = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='missing.pth')),
               pretrained='open-mmlab://resnet50_v1c',
               neck=dict(init_cfg=[dict(type='Xavier', layer='Conv2d'),
                                   dict(type='Pretrained', checkpoint='x.pth')]),
               head=dict(init_cfg=dict(type='Normal', std=0.01)))
    from acmix_mm.tool_models import without_pretrained
    out, dropped = without_pretrained(cfg)
    assert dropped == 3
    assert out['backbone']['init_cfg'] is None and out['pretrained'] is None
    assert out['neck']['init_cfg'] == [dict(type='Xavier', layer='Conv2d')]
    assert out['head'] == cfg['head']
    assert cfg['backbone']['init_cfg']['type'] == 'Pretrained'  # the input is not modified

    from acmix_mm.ops import ACMix
    net = torch.nn.Sequential(ACMix(8, 8, head=2), torch.nn.Conv2d(8, 8, 1), ACMix(8, 8, head=2))
    assert tool.set_attn_impl(net, 'unfold') == 2
    assert net[0].attn_impl == net[2].attn_impl == 'unfold'
    assert tool.set_attn_impl(net, 'auto') == 2
    assert net[0].attn_impl == ACMix(8, 8, head=2).attn_impl


def test_bad_inputs(capsys, tmp_path):
    with pytest.raises(FileNotFoundError, match='config file not found: configs/nope.py'):
        tool.main(['configs/nope.py'])
    with pytest.raises(ValueError, match="prefix must be one of mmdet::, mmseg::, got 'mmpose::'"):
        tool.main(['mmpose::foo/bar.py'])
    with pytest.raises(FileNotFoundError, match="mmdet has no config 'mask_rcnn/nope.py'"):
        tool.main(['mmdet::mask_rcnn/nope.py'])
    # Whole models of different kinds cannot share a batch.
    with pytest.raises(SystemExit):
        tool.main([DET_DEMO, '--vs', SEG_DEMO])
    assert '--part model compares whole models of one kind' in capsys.readouterr().err
    for bad in (['--iters', '0'], ['--shape', '64'], ['--attn-impl', 'fast'],
                ['--mode', 'backward']):
        with pytest.raises(SystemExit):
            tool.main([DET_DEMO] + bad)
    assert "invalid choice: 'backward'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tool.main([DET_DEMO, '--device', 'cuda'])
        assert 'CUDA is not available' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='train_dataloader.dataset.data_root='):
        tool.main([DET_DEMO, '--data', 'dataset', '--cfg-options',
                   f'train_dataloader.dataset.data_root={tmp_path / "missing"}'])
