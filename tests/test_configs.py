"""Every config under configs/ builds its model, takes a loss step and predicts, on CPU.

The real configs are built unchanged (full-width backbones and heads); only the images are small
(one 128x160 image) and SyncBN becomes BN, so that each config costs seconds on two cores.
Detection configs get random boxes (and masks for Mask R-CNN), segmentation configs a random
label map; mmseg configs are also run with sliding-window inference.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.structures import InstanceData, PixelData

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / 'configs').rglob('*.py')
                 if '_base_' not in p.parts and not p.name.startswith('_'))
H, W = 128, 160


def config_id(path: Path) -> str:
    return str(path.relative_to(REPO / 'configs'))


def syncbn_to_bn(node):
    """A copy of a config tree in which every SyncBN norm is a BN (no process group on CPU)."""
    if isinstance(node, dict):
        out = {k: syncbn_to_bn(v) for k, v in node.items()}
        if out.get('type') == 'SyncBN':
            out['type'] = 'BN'
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(syncbn_to_bn(v) for v in node)
    return node


def offline_checkpoints(node, torchvision_files: dict):
    """A copy of a config tree whose ``torchvision://NAME`` checkpoints of stock mmdet/mmseg
    backbones name the cached file instead: mmengine needs torchvision to look such a name up.
    ``open-mmlab://`` and acmix_mm's own backbones resolve through the hub cache as they are."""
    if isinstance(node, dict):
        out = {k: offline_checkpoints(v, torchvision_files) for k, v in node.items()}
        init_cfg = out.get('init_cfg')
        if (isinstance(init_cfg, dict) and str(out.get('type', '')).startswith('ResNet')
                and str(init_cfg.get('checkpoint', '')).startswith('torchvision://')):
            name = init_cfg['checkpoint'][len('torchvision://'):]
            out['init_cfg'] = dict(init_cfg, checkpoint=str(torchvision_files[name]))
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(offline_checkpoints(v, torchvision_files) for v in node)
    return node


def build(cfg: Config, checkpoints=None) -> torch.nn.Module:
    from acmix_mm.registry import build_model
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    registry = _registry(cfg.default_scope)
    torch.manual_seed(0)
    tree = syncbn_to_bn(cfg.model.to_dict())
    if checkpoints is not None:
        tree = offline_checkpoints(tree, checkpoints.paths)
    model = build_model(ConfigDict(tree), registry=registry)
    model.init_weights()
    return model


def _registry(scope: str):
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    elif scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        raise AssertionError(f'configs/ holds only mmdet and mmseg configs, got scope {scope!r}')
    return MODELS


def det_batch(with_masks: bool, gen: torch.Generator) -> dict:
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
    sample = DetDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W),
                                         scale_factor=(1.0, 1.0), img_id=0))
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 30.0, 150.0, 120.0]])
    gt = InstanceData(bboxes=boxes, labels=torch.tensor([0, 3]))
    if with_masks:
        masks = np.zeros((2, H, W), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        gt.masks = BitmapMasks(masks, H, W)
    sample.gt_instances = gt
    return dict(inputs=[image], data_samples=[sample])


def seg_batch(num_classes: int, gen: torch.Generator) -> dict:
    from mmseg.structures import SegDataSample
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, num_classes, (1, H, W), generator=gen)
    labels[:, :8] = 255  # an ignored border, as after padding
    sample = SegDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W)))
    sample.gt_sem_seg = PixelData(data=labels)
    return dict(inputs=[image], data_samples=[sample])


def loss_step(model: torch.nn.Module, batch: dict) -> dict:
    model.train()
    data = model.data_preprocessor(copy.deepcopy(batch), True)
    losses = model(**data, mode='loss')
    total, log_vars = model.parse_losses(losses)
    assert torch.isfinite(total), log_vars
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=1e-3)
    # The first backbone parameter that trains (warm-started configs freeze the stem).
    name, first = next((n, p) for n, p in model.backbone.named_parameters() if p.requires_grad)
    before = first.detach().clone()
    total.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert backbone_grads and all(g is not None for g in backbone_grads)
    optim.step()
    assert not torch.equal(before, first.detach()), name  # the backbone learns
    return log_vars


# Every config runs by default: each takes 2-5 s on an idle 2-core CPU at this image size.
@pytest.mark.parametrize('path', CONFIGS, ids=config_id)
def test_config_builds_trains_and_predicts(path, stock_checkpoints, monkeypatch):
    # Pretrained files (torchvision://resnet50, open-mmlab://resnet50_v1c) come from a hub
    # cache made offline, in the real files' layouts (tests/conftest.py).
    monkeypatch.setenv('TORCH_HOME', stock_checkpoints.torch_home)
    cfg = Config.fromfile(str(path))
    scope = cfg.get('default_scope')
    assert scope in ('mmdet', 'mmseg'), f'{path}: default_scope {scope!r}'
    gen = torch.Generator().manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        if scope == 'mmseg':
            # The crop size is only the training pad size; keep the small image unpadded.
            cfg.model.data_preprocessor.size = (H, W)
            model = build(cfg, stock_checkpoints)
            num_classes = cfg.model.decode_head.num_classes
            batch = seg_batch(num_classes, gen)
            # Two images in the loss step: UperNet's pyramid pooling has a 1x1 branch whose BN
            # cannot train on a single image (upstream trains it with SyncBN over 16 images).
            log_vars = loss_step(model, dict(inputs=batch['inputs'] * 2,
                                             data_samples=batch['data_samples'] * 2))
            assert any(k.endswith('loss_ce') for k in log_vars), log_vars
            for test_cfg in (dict(mode='whole'), dict(mode='slide', crop_size=(64, 96),
                                                      stride=(48, 64))):
                model.test_cfg = ConfigDict(test_cfg)
                model.eval()
                with torch.no_grad():
                    (pred,) = model.test_step(copy.deepcopy(batch))
                seg = pred.pred_sem_seg.data
                assert seg.shape == (1, H, W), test_cfg
                assert 0 <= int(seg.min()) and int(seg.max()) < num_classes
                assert pred.seg_logits.data.shape == (num_classes, H, W)
        else:
            with_masks = bool(cfg.model.get('roi_head', {}).get('mask_head'))
            model = build(cfg, stock_checkpoints)
            batch = det_batch(with_masks, gen)
            log_vars = loss_step(model, batch)
            assert any('loss_cls' in k for k in log_vars), log_vars
            if with_masks:
                assert any(k.endswith('loss_mask') for k in log_vars), log_vars  # s0.loss_mask...
            model.eval()
            with torch.no_grad():
                (pred,) = model.test_step(copy.deepcopy(batch))
            inst = pred.pred_instances
            n = len(inst)
            assert inst.bboxes.shape == (n, 4) and inst.scores.shape == (n,)
            if n:
                assert float(inst.bboxes[:, 2].max()) <= W + 1e-3
                assert float(inst.bboxes[:, 3].max()) <= H + 1e-3
            if with_masks:
                assert inst.masks.shape == (n, H, W)


def test_every_config_is_covered():
    scopes = {Config.fromfile(str(p)).default_scope for p in CONFIGS}
    assert scopes == {'mmdet', 'mmseg'}
    resnet = [p for p in CONFIGS if p.parent.name == 'acmix_resnet']
    assert {p.name for p in resnet} >= {
        'mask-rcnn_acmix-r50_fpn_1x_coco.py', 'retinanet_acmix-r50_fpn_1x_coco.py',
        'fpn_acmix-r50_4xb4-80k_ade20k-512x512.py',
        'mask-rcnn_acmix-r50-scratch_fpn_gn-all_6x_coco.py'}
    layer = {p.name for p in CONFIGS if p.parent.name == 'acmix_layer'}
    assert layer == {'mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py',
                     'retinanet_r50-acmix-c3-c5_fpn_1x_coco.py',
                     'upernet_r50-acmix-c3-c5_4xb4-80k_ade20k-512x512.py'}


RESNET_ACMIX_CONFIGS = [p for p in CONFIGS if p.parent.name == 'acmix_resnet']


@pytest.mark.parametrize('path', RESNET_ACMIX_CONFIGS, ids=config_id)
def test_resnet_acmix_configs_warm_start_or_say_scratch(path):
    """Warm start from torchvision's ResNet-50 by default; only the scratch recipe starts cold."""
    cfg = Config.fromfile(str(path))
    backbone = cfg.model.backbone
    assert backbone.type == 'acmix_mm.ResNetACMix' and backbone.depth == 50
    assert cfg.optim_wrapper.optimizer.type == 'SGD'
    if '-scratch_' in path.name:
        assert backbone.init_cfg is None and backbone.norm_cfg.type == 'GN'
        assert cfg.train_cfg.max_epochs == 73 and backbone.frozen_stages == -1
    else:
        assert backbone.init_cfg == dict(type='Pretrained', checkpoint='torchvision://resnet50')
        # Stage 1 holds ACMix layers that a stock file leaves at init: never frozen.
        assert backbone.get('frozen_stages', -1) <= 0
        assert backbone.norm_eval == (cfg.default_scope == 'mmdet')
    # The upstream ResNet's arguments must not leak into ours (mmseg's contract_dilation...).
    assert not {'contract_dilation', 'deep_stem', 'avg_down'} & set(backbone)
    assert cfg.model.get('pretrained') is None


@pytest.mark.parametrize('path', [p for p in CONFIGS if p.parent.name == 'acmix_layer'],
                         ids=config_id)
def test_acmix_layer_configs_change_only_the_backbones_acmix_lines(path, tmp_path):
    """Each equals its stock base config but for dcn and stage_with_dcn in the backbone."""
    cfg = Config.fromfile(str(path))
    stock = tmp_path / 'stock.py'  # a config of the base line alone: the stock config
    stock.write_text('_base_ = ' + path.read_text().split('_base_ = ', 1)[1].split('\n', 1)[0])
    base = Config.fromfile(str(stock))
    ours, theirs = cfg.to_dict(), base.to_dict()
    backbone = ours['model'].pop('backbone')
    stock_backbone = theirs['model'].pop('backbone')
    assert backbone.pop('dcn') == dict(type='acmix_mm.ACMix', kernel_att=7, head=4)
    assert backbone.pop('stage_with_dcn') == (False, True, True, True)
    assert backbone == stock_backbone
    assert ours['model'] == theirs['model']
    assert {k: v for k, v in ours.items() if k != 'model'} == {
        k: v for k, v in theirs.items() if k != 'model'}
