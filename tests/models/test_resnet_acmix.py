"""ResNetACMix: the authors' weights and outputs, shapes, freezing, norms, checkpointing, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from acmix_mm.models.backbones.resnet_acmix import ACMixBottleneck, ResNetACMix, build_norm
from acmix_mm.ops import ACMix
from tests.reference.resnet_acmix_authors import AuthorsResNetACmix

# The authors' 1000-class head: Linear(2048, 1000).
HEAD_PARAMS = 2048 * 1000 + 1000


def slim(**kwargs) -> ResNetACMix:
    """The demo-sized backbone: depth 26, stage widths 16/32/64/128."""
    kwargs = {'depth': 26, 'base_channels': 16, **kwargs}
    torch.manual_seed(0)
    model = ResNetACMix(**kwargs)
    model.init_weights()
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_eval_state(model: nn.Module) -> None:
    """Non-trivial BN statistics/affines and ACMix rates, so eval outputs test every tensor.

    Norm scales stay below 1 so that activations stay O(1) through 16 blocks, as in a trained
    network: exploding maps would saturate the softmax and make any comparison ill-conditioned.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(('running_mean', 'bn1.bias', 'bn2.bias', 'bn3.bias')):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith(('running_var', 'rate1', 'rate2')):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith('weight') and ('bn' in name or 'downsample.1' in name):
                tensor.copy_(0.2 + 0.4 * torch.rand(tensor.shape, generator=gen))


# ------------------------------------------------------------------ the authors' network
def test_parameter_count_depth50_without_head():
    assert n_params(ResNetACMix(50)) == 16_284_976
    # The spec's count with the classifier, as a cross-check of the reference.
    assert n_params(ResNetACMix(50)) + HEAD_PARAMS == 18_333_976


@pytest.mark.parametrize('depth, spec_millions_with_head', [(26, 10.49), (38, 14.41)])
def test_parameter_count_depth26_38_match_spec(depth, spec_millions_with_head):
    count = n_params(ResNetACMix(depth))
    assert round((count + HEAD_PARAMS) / 1e6, 2) == spec_millions_with_head
    assert count == n_params(AuthorsResNetACmix(depth)) - HEAD_PARAMS


@pytest.mark.parametrize('depth, size', [(26, 64), (50, 128)])
def test_authors_state_dict_loads_and_reproduces_stage_outputs(depth, size):
    torch.manual_seed(0)
    authors = AuthorsResNetACmix(depth)
    randomise_eval_state(authors)
    state = {k: v for k, v in authors.state_dict().items() if not k.startswith('fc.')}
    assert len(state) == len(authors.state_dict()) - 2  # only fc.weight and fc.bias left out

    ours = ResNetACMix(depth)
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    authors.eval()
    ours.eval()
    # The authors' operator needs maps of >= 4 px in its last stage, hence 128 px for depth 50.
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = authors.forward_stages(x)
        got = ours(x)
    assert len(got) == 4
    for stage, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, stage
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_module_names_follow_torchvision():
    names = set(dict(slim().named_parameters()))
    for key in ['conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer1.0.bn1.weight',
                'layer1.0.conv2.rate1', 'layer1.0.conv2.conv_p.bias', 'layer1.0.conv2.fc.weight',
                'layer1.0.conv2.dep_conv.weight', 'layer1.0.bn2.weight', 'layer1.0.conv3.weight',
                'layer1.0.bn3.weight', 'layer1.0.downsample.0.weight',
                'layer1.0.downsample.1.weight', 'layer4.0.downsample.0.weight']:
        assert key in names, key
    assert not any(n.startswith('fc.') for n in names)


# ------------------------------------------------------------------------------ init
def test_default_init_keeps_acmix_shift_and_zero_residual():
    model = slim()
    acmix_layers = [m for m in model.modules() if isinstance(m, ACMix)]
    assert len(acmix_layers) == sum((1, 2, 4, 1))
    for layer in acmix_layers:
        # The authors' kaiming loop overwrites this; ours restores it after kaiming.
        assert torch.equal(layer.dep_conv.weight, layer.shift_kernel())
        assert layer.rate1.item() == 0.5 and layer.rate2.item() == 0.5
    for block in model.modules():
        if isinstance(block, ACMixBottleneck):
            assert torch.count_nonzero(block.bn3.weight) == 0
            assert torch.all(block.bn1.weight == 1)
    # Kaiming (fan_out, relu) on the stem: std = sqrt(2 / (16 * 7 * 7)).
    std = model.conv1.weight.std().item()
    assert abs(std - math.sqrt(2 / (16 * 49))) < 0.15 * math.sqrt(2 / (16 * 49))


def test_zero_init_residual_off_keeps_unit_norms():
    model = slim(zero_init_residual=False)
    assert torch.all(model.layer2[0].bn3.weight == 1)


def test_pretrained_argument_is_deprecated_into_init_cfg():
    with pytest.warns(DeprecationWarning, match='pretrained is deprecated'):
        model = ResNetACMix(26, base_channels=16, pretrained='some/path.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='some/path.pth')


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('size', [(63, 97), (64, 64), (33, 17)])
def test_output_shapes_and_strides_at_odd_sizes(size):
    model = slim().eval()
    h, w = size
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    assert model.out_channels == (64, 128, 256, 512)
    for i, out in enumerate(outs):
        stride = 4 * 2**i
        assert out.shape == (2, 16 * 2**i * 4, math.ceil(h / stride), math.ceil(w / stride))
        assert torch.isfinite(out).all()


def test_dilated_output_stride_8_and_out_indices():
    model = slim(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), out_indices=(1, 3)).eval()
    assert model.layer4[0].conv2.dilation == 4 and model.layer3[1].conv2.dilation == 2
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 63, 97))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 13), (1, 512, 8, 13)]


def test_fewer_stages_and_stem_channels():
    model = slim(num_stages=2, out_indices=(0, 1), stem_channels=24).eval()
    assert not hasattr(model, 'layer3')
    assert model.conv1.out_channels == 24 and model.layer1[0].conv1.in_channels == 24
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 16), (1, 128, 8, 8)]


def test_acmix_stages_switch_middle_layer_type():
    model = slim(acmix_stages=(False, True, False, True))
    for stage, use_acmix in zip(range(1, 5), (False, True, False, True)):
        for block in getattr(model, f'layer{stage}'):
            assert isinstance(block.conv2, ACMix if use_acmix else nn.Conv2d)
            if not use_acmix:
                assert block.conv2.kernel_size == (3, 3)
    assert model.layer3[0].conv2.stride == (2, 2)
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 63, 97))
    assert outs[3].shape == (1, 512, 2, 4)


# ------------------------------------------------------------------- train behaviour
def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optim.zero_grad()
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    optim.step()


def test_frozen_stages_freeze_params_and_norms():
    model = slim(frozen_stages=2)
    randomise_eval_state(model)
    model.train()
    frozen = [model.conv1, model.bn1, model.layer1, model.layer2]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert model.layer3.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    for key in before:
        if key.startswith(('conv1.', 'bn1.', 'layer1.', 'layer2.')):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before['layer3.0.conv1.weight'], after['layer3.0.conv1.weight'])
    assert not torch.equal(before['layer4.0.bn1.running_mean'], after['layer4.0.bn1.running_mean'])


def test_frozen_stages_zero_freezes_only_the_stem():
    model = slim(frozen_stages=0).train()
    assert not model.conv1.weight.requires_grad and not model.bn1.training
    assert model.layer1[0].conv1.weight.requires_grad and model.layer1.training


def test_norm_eval_keeps_batchnorm_in_eval_under_train():
    model = slim(norm_eval=True)
    randomise_eval_state(model)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.training for bn in bns)
    assert model.training and model.layer1[0].conv2.training
    stats = model.layer2[0].bn2.running_mean.clone()
    _train_step(model, torch.randn(2, 3, 64, 64))
    assert torch.equal(stats, model.layer2[0].bn2.running_mean)
    # The affine parameters still learn.
    assert model.layer2[0].bn2.weight.requires_grad


def test_with_cp_gives_equal_outputs_and_gradients():
    plain, checkpointed = slim(), slim(with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    randomise_eval_state(plain)
    randomise_eval_state(checkpointed)
    # Eval-mode norms: recomputation in backward must not see different batch statistics.
    plain.eval()
    checkpointed.eval()
    x = torch.randn(1, 3, 48, 40)
    grads, calls = [], []
    for model in (plain, checkpointed):
        count = [0]
        model.layer2[0].conv1.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        xx = x.clone().requires_grad_(True)
        outs = model(xx)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        grads.append({'input': xx.grad, **{k: p.grad for k, p in model.named_parameters()}})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointing recomputes the block in backward
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        if grads[0][key] is None:
            assert grads[1][key] is None, key
            continue
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------- norms
def test_syncbn_runs_without_process_group_and_gn_builds():
    assert not torch.distributed.is_initialized()
    model = slim(norm_cfg=dict(type='SyncBN', requires_grad=True)).train()
    assert isinstance(model.bn1, nn.SyncBatchNorm)
    outs = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(outs[-1]).all()
    model = slim(norm_cfg=dict(type='GN', num_groups=8))
    assert isinstance(model.layer1[0].bn3, nn.GroupNorm) and model.layer1[0].bn3.num_groups == 8
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0  # zero-init residual applies


def test_norm_requires_grad_false_freezes_affine():
    norm = build_norm(dict(type='BN', requires_grad=False, eps=1e-3), 8)
    assert norm.eps == 1e-3 and not norm.weight.requires_grad


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize('kwargs, error, match', [
    (dict(depth=34), ValueError, r'invalid depth 34.*\[26, 38, 50, 101\]'),
    (dict(depth=26, out_indices=()), ValueError, 'out_indices is empty'),
    (dict(depth=26, out_indices=(0, 4)), ValueError, r'out_indices must be in \[0, 3\], got 4'),
    (dict(depth=26, out_indices=(-1,)), ValueError, r'out_indices must be in \[0, 3\], got -1'),
    (dict(depth=26, out_indices=(1, 1)), ValueError, 'duplicates'),
    (dict(depth=26, num_stages=2), ValueError, r'out_indices must be in \[0, 1\], got 2'),
    (dict(depth=26, num_stages=5), ValueError, r'num_stages must be in \[1, 4\], got 5'),
    (dict(depth=26, frozen_stages=5), ValueError, r'frozen_stages must be in \[-1, 4\], got 5'),
    (dict(depth=26, frozen_stages=-2), ValueError, r'frozen_stages must be in \[-1, 4\]'),
    (dict(depth=26, acmix_stages=(True, False)), ValueError, 'acmix_stages must have one entry'),
    (dict(depth=26, acmix_stages=(1, 1, 1, 1)), TypeError, r'acmix_stages\[0\] must be a bool'),
    (dict(depth=26, strides=(1, 2, 2)), ValueError, 'strides must have one entry per stage'),
    (dict(depth=26, dilations=(1, 1, 0, 1)), ValueError, r'dilations\[2\] must be >= 1, got 0'),
    (dict(depth=26, style='caffe'), ValueError, "style 'caffe' is not supported"),
    (dict(depth=26, base_channels=18), ValueError, 'head=4 must divide every ACMix stage width'),
    (dict(depth=26, head=3), ValueError, r'stage 0 is base_channels \* 2\*\*0 = 64'),
    (dict(depth=26, norm_cfg=dict(type='LN')), ValueError, "norm_cfg type 'LN' is not supported"),
    (dict(depth=26, norm_cfg=dict(type='GN')), ValueError, 'GN needs num_groups'),
    (dict(depth=26, norm_cfg='BN'), TypeError, 'norm_cfg must be a dict'),
    (dict(depth=26, norm_eval=1), TypeError, 'norm_eval must be a bool'),
    (dict(depth=26, pretrained='a.pth', init_cfg=dict(type='Kaiming')), ValueError,
     'cannot both be set'),
    (dict(depth=26, pretrained=3), TypeError, 'pretrained must be a str'),
    (dict(depth=26, init_cfg=dict(checkpoint='a.pth')), TypeError, 'dict with a "type" key'),
    (dict(depth=26, kernel_att=4), ValueError, 'kernel_att must be odd'),
    (dict(depth=26, attn_impl='fast'), ValueError, 'attn_impl must be one of'),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResNetACMix(**kwargs)


def test_base_channels_not_divisible_by_head_is_fine_without_acmix():
    model = ResNetACMix(26, base_channels=18, acmix_stages=(False,) * 4)
    assert model.layer1[0].conv2.out_channels == 18


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r'expects a \(B, 3, H, W\) input, got shape \(1, 1, 32, 32\)'):
        slim()(torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------ pretrained loading
def _authors_file(tmp_path, depth: int):
    """The authors' training-script layout: weights under 'model', with the fc head."""
    torch.manual_seed(3)
    authors = AuthorsResNetACmix(depth)
    randomise_eval_state(authors)
    path = tmp_path / f'resnet_acmix{depth}_authors.pth'
    torch.save({'model': authors.state_dict(), 'epoch': 299, 'max_accuracy': 76.1}, path)
    return authors, path


def test_init_cfg_pretrained_loads_authors_file_and_drops_fc(tmp_path):
    from acmix_mm.checkpoint import CheckpointError
    authors, path = _authors_file(tmp_path, 26)
    model = ResNetACMix(26, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    report = model.load_pretrained(str(path))
    assert sorted(k for k, _ in report.dropped) == ['fc.bias', 'fc.weight']
    assert report.missing == [] and report.loaded == len(model.state_dict())

    fresh = ResNetACMix(26, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    fresh.init_weights()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, authors.state_dict()[key]), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(fresh.eval()(x), authors.eval().forward_stages(x)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # A checkpoint of another depth does not fit: a clear error, nothing half-loaded silently.
    other = ResNetACMix(38, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError, match='does not fit ResNetACMix'):
        other.init_weights()
    missing = ResNetACMix(26, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'no.pth')))
    with pytest.raises(FileNotFoundError):
        missing.init_weights()


def test_detector_config_loads_backbone_checkpoint(tmp_path):
    """The config route: mmdet's init_weights reaches ResNetACMix's Pretrained loading."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmdet.registry import MODELS as MMDET_MODELS

    from acmix_mm.registry import build_model
    authors, path = _authors_file(tmp_path, 50)
    repo = Path(__file__).resolve().parents[2]
    cfg = Config.fromfile(str(repo / 'configs/acmix_resnet/retinanet_acmix-r50_fpn_1x_coco.py'))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(path))
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = build_model(cfg.model, registry=MMDET_MODELS)
    detector.init_weights()
    for key in ['conv1.weight', 'layer3.5.conv2.dep_conv.weight', 'layer4.2.bn3.running_var',
                'layer2.0.conv2.rate1']:
        assert torch.equal(detector.backbone.state_dict()[key], authors.state_dict()[key]), key
