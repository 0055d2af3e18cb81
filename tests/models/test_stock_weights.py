"""ImageNet weights that exist, into networks with ACMix layers.

Stock mmdet/mmseg ResNets with ACMix in c3-c5 load their usual ``init_cfg=Pretrained`` file
through mmengine; ResNetACMix loads a stock ResNet file of its depth through acmix_mm's safe
loader. In both, every tensor the file has for a layer the two networks share loads exactly, the
replaced convs' tensors are reported as unused and the ACMix layers keep their init, in one line.
The files are made by ``tests/conftest.py`` in the real files' layouts and names.
"""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope

from acmix_mm.models.backbones.resnet_acmix import ResNetACMix
from acmix_mm.models.backbones.swin_acmix import SwinACMix
from acmix_mm.checkpoint import CheckpointError, resolve_checkpoint
from acmix_mm.ops import ACMix

C3_C5 = (False, True, True, True)
REPLACED_LINE = 'ACMix layers replace convs of the checkpoint'


@contextlib.contextmanager
def mm_log():
    """The messages that mmengine's current logger receives inside the block."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    handler = Collect(level=logging.DEBUG)
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def acmix_state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()
            if any(k.startswith(f'{n}.') for n, m in model.named_modules() if isinstance(m, ACMix))}


def build(scope: str, cfg: dict) -> torch.nn.Module:
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(ConfigDict(cfg))


def assert_shared_layers_exact(model: torch.nn.Module, file_state: dict, skip=()) -> int:
    """Every file tensor of a layer the model shares equals the model's, bit for bit."""
    own = model.state_dict()
    checked = 0
    for key, value in file_state.items():
        if key.startswith(tuple(skip)):
            continue
        assert torch.equal(own[key], value), key
        checked += 1
    return checked


# --------------------------------------------------------------------------- stock backbones
@pytest.mark.parametrize('scope, cfg, file', [
    ('mmdet', dict(type='ResNet', depth=50), 'resnet50'),
    ('mmseg', dict(type='ResNetV1c', depth=50), 'resnet50_v1c'),
])
def test_stock_backbone_pretrained_loads_all_but_the_replaced_convs(
        scope, cfg, file, stock_checkpoints, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', stock_checkpoints.torch_home)
    # open-mmlab:// resolves offline through the hub cache; torchvision:// needs torchvision to
    # look its URL up, so the torchvision-layout file is named by path.
    checkpoint = ('open-mmlab://resnet50_v1c' if file == 'resnet50_v1c'
                  else str(stock_checkpoints.paths[file]))
    model = build(scope, dict(cfg, dcn=dict(type='acmix_mm.ACMix'), stage_with_dcn=C3_C5,
                              init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
    before = acmix_state(model)
    with mm_log() as lines:
        model.init_weights()
    state = stock_checkpoints.states[file]
    replaced = [n for n, m in model.named_modules() if isinstance(m, ACMix)]
    assert len(replaced) == 13
    conv_keys = [f'{n}.weight' for n in replaced]
    checked = assert_shared_layers_exact(model, state, skip=('fc.',) + tuple(conv_keys))
    assert checked == len(state) - 13 - (2 if file == 'resnet50' else 0)
    after = acmix_state(model)
    assert after.keys() == before.keys() and len(after) == 13 * 12
    for key in before:  # the ACMix layers keep their init (shift kernel, rates, 1x1 convs)
        assert torch.equal(after[key], before[key]), key
    reports = [line for line in lines if REPLACED_LINE in line]
    expected_name = 'ResNet' if scope == 'mmdet' else 'ResNetV1c'
    assert reports == [
        f'{expected_name}: 13 ACMix layers replace convs of the checkpoint (layer2.0.conv2, '
        "layer2.1.conv2, ..., layer4.2.conv2): its 13 conv tensors there are unused; the layers' "
        '156 ACMix tensors keep their init']
    # mmengine's own mismatch report names only the classifier, not hundreds of ACMix keys.
    mismatch = [line for line in lines if 'do not match exactly' in line]
    if file == 'resnet50':
        assert len(mismatch) == 1 and 'unexpected key in source state_dict: fc.weight, fc.bias' \
            in mismatch[0] and 'conv2' not in mismatch[0]
    else:
        assert mismatch == []


def test_shift_init_survives_without_pretrained():
    model = build('mmdet', dict(type='ResNet', depth=50, dcn=dict(type='acmix_mm.ACMix'),
                                stage_with_dcn=C3_C5))
    torch.nn.init.zeros_(model.layer2[0].conv2.dep_conv.weight)  # as a stray init would
    model.init_weights()  # the ResNet's Kaiming(layer='Conv2d'), then every block's init
    for m in model.modules():
        if isinstance(m, ACMix):
            assert torch.equal(m.dep_conv.weight, m.shift_kernel())
            assert m.rate1.item() == m.rate2.item() == 0.5


def test_strict_torch_load_of_a_stock_state_dict(stock_checkpoints):
    model = build('mmdet', dict(type='ResNet', depth=50, dcn=dict(type='acmix_mm.ACMix'),
                                stage_with_dcn=C3_C5))
    state = {k: v for k, v in stock_checkpoints.states['resnet50'].items() if not k.startswith('fc.')}
    before = acmix_state(model)
    result = model.load_state_dict(state, strict=False)
    # Only the BN counters that torchvision's file lacks are missing; nothing is unexpected.
    assert result.unexpected_keys == []
    assert all(k.endswith('num_batches_tracked') for k in result.missing_keys)
    assert all(torch.equal(v, acmix_state(model)[k]) for k, v in before.items())


def test_a_conv_of_another_shape_is_not_taken(stock_checkpoints):
    """A file whose conv at an ACMix layer has another shape is a real mismatch: reported."""
    model = build('mmdet', dict(type='ResNet', depth=50, dcn=dict(type='acmix_mm.ACMix'),
                                stage_with_dcn=(False, False, False, True)))
    state = dict(stock_checkpoints.states['resnet50'])
    state['layer4.0.conv2.weight'] = torch.zeros(512, 512, 5, 5)
    result = model.load_state_dict(state, strict=False)
    assert 'layer4.0.conv2.weight' in result.unexpected_keys
    assert 'layer4.0.conv2.rate1' in result.missing_keys
    assert 'layer4.1.conv2.rate1' not in result.missing_keys  # the other two are taken


# --------------------------------------------------------------------------- ResNetACMix
def _wrapped(kind: str, state: dict) -> object:
    if kind == 'torchvision':
        return state
    if kind == 'mmdet':  # a whole detector: backbone. prefix, other components dropped
        return {'state_dict': {**{f'backbone.{k}': v for k, v in state.items()},
                               'neck.lateral_convs.0.conv.weight': torch.zeros(1)},
                'meta': {'epoch': 12}}
    return {'state_dict': state, 'meta': {'mmengine_version': '0.10.7'}}  # mmengine wrapper


@pytest.mark.parametrize('kind', ['torchvision', 'mmdet', 'mmengine'])
def test_resnet_acmix_warm_starts_from_a_stock_resnet(kind, stock_checkpoints, tmp_path):
    state = stock_checkpoints.states['resnet50']
    path = tmp_path / 'stock.pth'
    torch.save(_wrapped(kind, state), path)
    torch.manual_seed(0)
    model = ResNetACMix(depth=50, frozen_stages=0, norm_eval=True,
                        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model._default_init()
    before = acmix_state(model)
    with mm_log() as lines:
        report = model.load_pretrained(str(path))
    replaced = [n for n, m in model.named_modules() if isinstance(m, ACMix)]
    assert report.replaced_layers == replaced and len(replaced) == 16
    conv_keys = tuple(f'{n}.weight' for n in replaced)
    checked = assert_shared_layers_exact(model, state, skip=('fc.',) + conv_keys)
    assert checked == len(state) - 16 - 2
    assert all(torch.equal(acmix_state(model)[k], v) for k, v in before.items())
    summary = [line for line in lines if line.startswith('ResNetACMix <- ')]
    assert len(summary) == 1
    dropped = 'dropped 3 (1 outside backbone; 2 classifier)' if kind == 'mmdet' \
        else 'dropped 2 (2 classifier)'
    assert summary[0].endswith(
        f'{dropped}; kept at init 0; 53 BN num_batches_tracked counters not in the '
        'file (start at 0); 16 ACMix layers replace convs of the checkpoint (layer1.0.conv2, '
        "layer1.1.conv2, ..., layer4.2.conv2): its 16 conv tensors there are unused; the layers' "
        '192 ACMix tensors keep their init')


def test_resnet_acmix_from_torchvision_uri_offline(stock_checkpoints, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', stock_checkpoints.torch_home)
    assert resolve_checkpoint('torchvision://resnet50') == str(stock_checkpoints.paths['resnet50'])
    model = ResNetACMix(depth=50, init_cfg=dict(type='Pretrained',
                                                checkpoint='torchvision://resnet50'))
    model.init_weights()
    assert torch.equal(model.conv1.weight, stock_checkpoints.states['resnet50']['conv1.weight'])
    assert torch.equal(model.layer1[0].conv2.dep_conv.weight,
                       model.layer1[0].conv2.shift_kernel())


def test_frozen_stage_with_acmix_layers_at_init_warns(stock_checkpoints):
    model = ResNetACMix(depth=50, frozen_stages=1)
    with mm_log() as lines:
        model.load_pretrained(str(stock_checkpoints.paths['resnet50']))
    warned = [line for line in lines if 'will never train' in line]
    assert len(warned) == 1 and warned[0].startswith(
        'ResNetACMix: frozen_stages=1 freezes 3 ACMix layers that ')
    assert '(layer1.0.conv2, layer1.1.conv2, layer1.2.conv2)' in warned[0]


@pytest.mark.parametrize('file, message', [
    ('resnet101', r'does not fit ResNetACMix.*checkpoint keys not in the model \(layer3\.\* 255\)'),
    ('resnet18', r'does not fit ResNetACMix.*model keys missing from the checkpoint'),
    ('resnet50_v1c', r'does not fit ResNetACMix.*checkpoint keys not in the model \(stem\.\*'),
    ('swin', r'does not fit ResNetACMix.*checkpoint keys not in the model \(stages\.\*'),
])
def test_other_depths_and_families_are_refused(file, message, stock_checkpoints, tmp_path):
    if file == 'swin':
        path = tmp_path / 'swin.pth'
        torch.save(SwinACMix(dict(embed_dims=16, depths=(1, 1, 2, 1),
                                  num_heads=(1, 2, 4, 8))).state_dict(), path)
    else:
        path = stock_checkpoints.paths[file]
    model = ResNetACMix(depth=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        model.load_pretrained(str(path))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half-loaded


@pytest.mark.parametrize('uri, message', [
    ('torchvision://resnet51', "unknown torchvision checkpoint 'torchvision://resnet51'; "
                               'allowed names: alexnet, '),
    ('s3://bucket/r50.pth', "checkpoint 's3://bucket/r50.pth': unknown scheme; allowed: a file "
                            'path or torchvision://..., http://..., https://...'),
])
def test_bad_checkpoint_uris(uri, message):
    with pytest.raises(ValueError) as info:
        resolve_checkpoint(uri)
    assert message in str(info.value)


def test_failed_download_names_the_url_and_leaves_no_file(tmp_path, monkeypatch):
    """A URL that cannot be fetched (a closed loopback port): a clear error, nothing cached."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint('http://127.0.0.1:9/resnet50-0676ba61.pth')
    message = str(info.value)
    assert message.startswith("checkpoint 'http://127.0.0.1:9/resnet50-0676ba61.pth': downloading "
                              'http://127.0.0.1:9/resnet50-0676ba61.pth into ')
    assert 'put the file there by hand or name a local path' in message
    folder = tmp_path / 'hub' / 'checkpoints'
    assert not folder.exists() or list(folder.iterdir()) == []
