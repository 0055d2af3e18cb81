"""ONNX export (acmix_mm.export, tools/export_onnx.py): onnxruntime matches PyTorch.

Every exported file is run on onnxruntime's CPU provider and compared with the PyTorch model in
eval mode on its *default* attention path (the export itself goes through 'unfold').
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx  # requirements/tests.txt: onnx, onnxruntime (and onnxscript for --exporter dynamo)
import pytest
import torch
from mmengine.config import Config

from acmix_mm import export as E
from acmix_mm.ops import ACMix

REPO = Path(__file__).resolve().parents[1]
DEMO_DET = REPO / 'configs/demo/maskrcnn_acmix-r26-slim_shapes-coco.py'
DEMO_SEG = REPO / 'configs/demo/semfpn_acmix-r26-slim_shapes-ade.py'
RETINANET = REPO / 'configs/acmix_resnet/retinanet_acmix-r50_fpn_1x_coco.py'
SWIN = REPO / 'configs/acmix_swin/mask-rcnn_acmix-swin-t-p4-w7_fpn_1x_coco.py'
STOCK_RETINANET = REPO / 'configs/acmix_layer/retinanet_r50-acmix-c3-c5_fpn_1x_coco.py'
# RetinaNet with a slim ResNet-ACMix-26 (ACMix in stage 4: the backbone tests cover ACMix's
# export; this one the detector's tensor mode) and 64-channel neck/head: the config's own
# detector, small enough for the default test run.
SLIM_RETINANET = [
    'model.backbone.depth=26', 'model.backbone.base_channels=16',
    'model.backbone.acmix_stages=(False,False,False,True)',
    'model.neck.in_channels=[64,128,256,512]', 'model.neck.out_channels=64',
    'model.bbox_head.in_channels=64',
    'model.bbox_head.feat_channels=64']


def _tool():
    spec = importlib.util.spec_from_file_location('export_onnx_tool', REPO / 'tools/export_onnx.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _reference(target: E.ExportTarget, x: torch.Tensor):
    with torch.no_grad():
        return target.module(x)


@pytest.fixture(scope='module')
def demo_backbone(tmp_path_factory):
    """The demo detector's backbone (ResNet-ACMix-26 width 16) exported at 1x3x96x128."""
    cfg = Config.fromfile(str(DEMO_DET))
    target = E.build_export_target(cfg, 'backbone', shape=(96, 128))
    path = str(tmp_path_factory.mktemp('onnx') / 'backbone.onnx')
    impls = [m.attn_impl for m in target.module.modules() if isinstance(m, ACMix)]
    assert impls and 'unfold' not in impls  # the model's own (default) paths
    n_acmix, _ = E.export_onnx(target.module, target.inputs, path, target.output_names,
                               metadata=target.metadata)
    # The model was put back on its own attention paths after the export.
    assert [m.attn_impl for m in target.module.modules() if isinstance(m, ACMix)] == impls
    return target, path, n_acmix


def test_backbone_matches_pytorch(demo_backbone):
    target, path, n_acmix = demo_backbone
    assert n_acmix == 5  # stages 3-4 of depth 26: 4 + 1 ACMix bottlenecks
    # A fresh input (not the one traced), against the default ('auto') attention path.
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1)) * 2
    reference = _reference(target, x)
    got = E.run_onnxruntime(path, x)
    assert [g.shape for g in got] == [(1, 64, 24, 32), (1, 128, 12, 16), (1, 256, 6, 8),
                                      (1, 512, 3, 4)]
    report = E.compare_outputs(target.output_names, reference, got)
    assert report.passed(1e-4), report.summary()
    assert report.worst_abs < 1e-4
    # The reference is not trivially zero: the comparison has something to compare.
    assert min(float(r.abs().max()) for r in reference) > 1e-2


def test_backbone_file_metadata_and_fixed_size(demo_backbone):
    target, path, _ = demo_backbone
    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    assert props['acmix_mm.part'] == 'backbone'
    assert json.loads(props['acmix_mm.input_shape']) == [1, 3, 96, 128]
    assert json.loads(props['acmix_mm.mean']) == [123.675, 116.28, 103.53]
    assert json.loads(props['acmix_mm.bgr_to_rgb']) is True
    assert 'randomly initialised' in props['acmix_mm.weights']
    assert [o.name for o in model.graph.output] == ['feat0', 'feat1', 'feat2', 'feat3']
    # Fixed-size export: another H x W is refused by onnxruntime rather than computed wrongly.
    with pytest.raises(Exception, match='[Ii]nvalid dimensions'):
        E.run_onnxruntime(path, torch.randn(1, 3, 64, 128))
    # Nothing but the file in its folder: the temporary file was renamed.
    assert os.listdir(os.path.dirname(path)) == ['backbone.onnx']


def test_swin_backbone_matches_pytorch(tmp_path):
    """SwinACMix-T: padded windows (18x25 -> 21x28), shifted masks, window = map at stage 4."""
    cfg = Config.fromfile(str(SWIN))
    target = E.build_export_target(cfg, 'backbone', shape=(72, 100))
    path = str(tmp_path / 'swin.onnx')
    E.export_onnx(target.module, target.inputs, path, target.output_names)
    x = torch.randn(1, 3, 72, 100, generator=torch.Generator().manual_seed(2))
    got = E.run_onnxruntime(path, x)
    assert [g.shape for g in got] == [(1, 96, 18, 25), (1, 192, 9, 13), (1, 384, 5, 7),
                                      (1, 768, 3, 4)]
    report = E.compare_outputs(target.output_names, _reference(target, x), got)
    assert report.passed(1e-4), report.summary()


def test_stock_resnet_with_acmix_stages_matches_pytorch(tmp_path):
    """mmdet's own ResNet-50 with ACMix as its conv layer (dcn=ACMix), stage 4 only to keep the
    export quick: the three ACMix layers go through 'unfold', the rest is the stock network."""
    cfg = Config.fromfile(str(STOCK_RETINANET))
    cfg.merge_from_dict({'model.backbone.stage_with_dcn': (False, False, False, True)})
    target = E.build_export_target(cfg, 'backbone', shape=(64, 96))
    assert type(target.module.module).__name__ == 'ResNet'
    path = str(tmp_path / 'r50_acmix.onnx')
    n_acmix, _ = E.export_onnx(target.module, target.inputs, path, target.output_names)
    assert n_acmix == 3
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    got = E.run_onnxruntime(path, x)
    assert [g.shape for g in got] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6),
                                      (1, 2048, 2, 3)]
    report = E.compare_outputs(target.output_names, _reference(target, x), got)
    assert report.passed(1e-4), report.summary()


def test_retinanet_tensor_mode_via_tool(tmp_path, capsys):
    """RetinaNet's backbone + FPN + head, exported at batch 2 with a dynamic batch dimension,
    checked by the tool (--check), then run at batch 1 and 3."""
    out = tmp_path / 'retinanet.onnx'
    code = _tool().main([str(RETINANET), '--part', 'model', '--shape', '96', '128', '--batch',
                         '2', '--dynamic-batch', '--out', str(out), '--check', '--cfg-options',
                         *SLIM_RETINANET])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert 'parity check PASSED' in printed
    assert 'randomly initialised' in printed
    # RetinaNet: 9 anchors x 80 classes and 9 x 4 box deltas on 5 levels (strides 8..128).
    graph = onnx.load(str(out)).graph
    names = [o.name for o in graph.output]
    assert names == [f'cls_score.{i}' for i in range(5)] + [f'bbox_pred.{i}' for i in range(5)]
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    got = E.run_onnxruntime(str(out), x)
    sizes = ((12, 16), (6, 8), (3, 4), (2, 2), (1, 1))
    assert [g.shape for g in got] == ([(2, 720, h, w) for h, w in sizes]
                                      + [(2, 36, h, w) for h, w in sizes])
    # The images of a batch are computed independently: other batch sizes give the same
    # per-image outputs (batch 1 = the first image, batch 3 = the two plus another).
    one = E.run_onnxruntime(str(out), x[:1])
    three = E.run_onnxruntime(str(out), torch.cat([x, torch.randn(1, 3, 96, 128)]))
    assert [g.shape[0] for g in one] == [1] * 10 and [g.shape[0] for g in three] == [3] * 10
    assert all(np.allclose(a[:1], b, atol=1e-5) for a, b in zip(got, one))
    assert all(np.allclose(a, b[:2], atol=1e-5) for a, b in zip(got, three))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props['acmix_mm.input_shape']) == ['batch', 3, 96, 128]


def test_semantic_fpn_tensor_mode(tmp_path):
    """mmseg's EncoderDecoder tensor mode: backbone + FPN + FPNHead -> (B, K, H/4, W/4)."""
    cfg = Config.fromfile(str(DEMO_SEG))
    # ACMix in stage 4 only (the backbone tests cover ACMix's export), to keep the test quick.
    cfg.merge_from_dict({'model.backbone.acmix_stages': (False, False, False, True)})
    target = E.build_export_target(cfg, 'model', shape=(64, 96))
    assert target.output_names == ['seg_logits']
    path = str(tmp_path / 'semfpn.onnx')
    E.export_onnx(target.module, target.inputs, path, target.output_names)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    got = E.run_onnxruntime(path, x)
    assert got[0].shape == (1, 5, 16, 24)
    report = E.compare_outputs(target.output_names, _reference(target, x), got)
    assert report.passed(1e-4), report.summary()


def test_checkpoint_weights_are_exported(tmp_path):
    """CKPT loads safely into the whole model (Lightning layout) or into the backbone alone."""
    cfg = Config.fromfile(str(DEMO_DET))
    random_target = E.build_export_target(cfg, 'backbone', shape=(64, 64))
    backbone = random_target.module.module
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in backbone.state_dict().items()}
    whole = tmp_path / 'whole.ckpt'
    torch.save({'state_dict': {f'model.backbone.{k}': v for k, v in state.items()}}, whole)
    # ... a whole-model checkpoint needs the other keys too: the backbone's are not enough.
    with pytest.raises(ValueError, match='missing'):
        E.build_export_target(cfg, 'model', checkpoint=str(whole), shape=(64, 64))
    bare = tmp_path / 'backbone.pth'
    torch.save(state, bare)
    target = E.build_export_target(cfg, 'backbone', checkpoint=str(bare), shape=(64, 64))
    assert 'backbone.pth' in target.weights
    loaded = target.module.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not torch.equal(loaded['conv1.weight'], backbone.state_dict()['conv1.weight'])


def test_failed_verify_leaves_no_file(tmp_path):
    """A failing check aborts before the rename: no file at the path, no temporary left."""
    layer = ACMix(8, 8, head=2).eval()
    module = E.FlatOutputs(layer)
    x = torch.randn(1, 8, 9, 11)
    path = tmp_path / 'layer.onnx'
    seen = []

    def verify(tmp: str) -> None:
        got = E.run_onnxruntime(tmp, x)
        with torch.no_grad():
            seen.append(E.compare_outputs(['out'], [layer(x)], got))
        raise E.ExportError('rejected')

    with pytest.raises(E.ExportError, match='rejected'):
        E.export_onnx(module, x, str(path), ['out'], verify=verify)
    assert seen and seen[0].passed(1e-4), seen[0].summary()  # the rejected file was right
    assert os.listdir(tmp_path) == []
    assert layer.attn_impl == 'auto'


def test_parity_failure_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    # A negative tolerance cannot be met: the tool must report the failure and write nothing.
    # (A backbone without ACMix layers: this tests the tool's failure path, quickly.)
    monkeypatch.setattr(E, 'TOLERANCE', -1.0)
    out = tmp_path / 'backbone.onnx'
    code = _tool().main([str(DEMO_DET), '--part', 'backbone', '--shape', '32', '32', '--out',
                         str(out), '--check', '--cfg-options',
                         'model.backbone.acmix_stages=(False,False,False,False)'])
    captured = capsys.readouterr()
    assert code == 1
    assert 'parity check FAILED' in captured.err and 'not written' in captured.err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('argv, message', [
    (['--part', 'model', '--shape', '0', '64'], 'shape H must be a positive int'),
    (['--part', 'backbone', '--opset', '9'],
     'opset must be an int in [11, 20] for the torchscript exporter'),
    (['--part', 'backbone', '--exporter', 'dynamo', '--opset', '17'],
     'opset must be an int in [18, 23] for the dynamo exporter'),
    (['--part', 'backbone', '--exporter', 'dynamo', '--dynamic-batch'],
     '--dynamic-batch works with --exporter torchscript only'),
    (['--part', 'backbone', '--batch', '0'], 'batch must be a positive int, got 0'),
    (['--part', 'backbone', '--out', 'model.pt'], "--out must name a .onnx file"),
    (['missing.pth', '--part', 'backbone'], 'checkpoint file not found: missing.pth'),
    (['--part', 'model'], 'cannot export the two-stage detector MaskRCNN'),
])
def test_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would land here
    code = _tool().main([str(DEMO_DET), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert os.listdir(tmp_path) == []


def test_bad_part_and_missing_config(capsys, tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(DEMO_DET), '--part', 'neck'])
    assert exit_info.value.code == 2
    assert "invalid choice: 'neck'" in capsys.readouterr().err
    assert tool.main([str(tmp_path / 'nope.py'), '--part', 'backbone']) == 2
    assert 'config file not found' in capsys.readouterr().err
    with pytest.raises(E.ExportError, match="part must be one of"):
        E.build_export_target(Config.fromfile(str(DEMO_DET)), 'neck')


@pytest.mark.slow
def test_dynamo_exporter_backbone(tmp_path, capsys):
    """The torch.export-based exporter (minutes of CPU) gives the same outputs."""
    out = tmp_path / 'backbone_dynamo.onnx'
    code = _tool().main([str(DEMO_DET), '--part', 'backbone', '--shape', '96', '128', '--out',
                         str(out), '--exporter', 'dynamo', '--check'])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert 'parity check PASSED' in printed and 'dynamo exporter, opset 18' in printed
    assert os.listdir(tmp_path) == ['backbone_dynamo.onnx']  # one self-contained file
