"""ACMix as a conv layer type: registration, arguments, ConvModule, stock backbones, init.

The stock backbones are mmdet's and mmseg's own classes built through their registries, with
ACMix entering as ``dcn=dict(type='acmix_mm.ACMix')`` (mmcv's ``build_conv_layer``), exactly as
a config would build them.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope
from torch import nn

from acmix_mm.models.flops import acmix_flops_breakdown, count_flops
from acmix_mm.ops import ACMix, ACMixConv2d, ShiftConv2d, build_acmix_conv

DCN = dict(type='acmix_mm.ACMix')
C3_C5 = (False, True, True, True)


def registry(scope: str):
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def build(scope: str, cfg: dict) -> nn.Module:
    with DefaultScope.overwrite_default_scope(scope):
        return registry(scope).build(ConfigDict(cfg))


def acmix_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, ACMix)}


def assert_acmix_init(layer: ACMix) -> None:
    assert torch.equal(layer.dep_conv.weight, layer.shift_kernel())
    assert layer.rate1.item() == 0.5 and layer.rate2.item() == 0.5


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize('scope, package', [('mmdet', 'mmdet.models'), ('mmseg', 'mmseg.models')])
def test_scoped_type_needs_no_import(scope, package):
    """'acmix_mm.ACMix' from mmdet's / mmseg's scope in a process that never imported acmix_mm."""
    code = textwrap.dedent(f'''
        import sys, warnings
        warnings.simplefilter('ignore')
        import {package}
        from mmcv.cnn import build_conv_layer
        from mmengine.registry import init_default_scope
        init_default_scope('{scope}')
        assert 'acmix_mm' not in sys.modules
        layer = build_conv_layer(dict(type='acmix_mm.ACMix', head=2), 8, 8, 3, stride=2, padding=1)
        print(type(layer).__module__, type(layer).__name__, layer.head, layer.stride)
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['acmix_mm.ops.conv_layer', 'ACMixConv2d', '2', '(2,', '2)']


@pytest.mark.parametrize('scope, backbone', [
    ('mmdet', dict(type='ResNet', depth=50)),
    ('mmseg', dict(type='ResNetV1c', depth=50)),
])
def test_bare_type_after_custom_imports(tmp_path, scope, backbone):
    """A config file with custom_imports and dcn=dict(type='ACMix'), built in its scope."""
    path = tmp_path / 'cfg.py'
    path.write_text(textwrap.dedent(f'''
        custom_imports = dict(imports=['acmix_mm'], allow_failed_imports=False)
        default_scope = '{scope}'
        backbone = dict({", ".join(f"{k}={v!r}" for k, v in backbone.items())},
                        dcn=dict(type='ACMix', head=2), stage_with_dcn=(False, False, False, True))
    '''))
    cfg = Config.fromfile(str(path))
    model = build(scope, cfg.backbone)
    layers = acmix_layers(model)
    assert sorted(layers) == ['layer4.0.conv2', 'layer4.1.conv2', 'layer4.2.conv2']
    assert all(type(m) is ACMixConv2d and m.head == 2 for m in layers.values())


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize('kernel_size, stride, dilation, padding', [
    (3, 1, 1, 1), (3, 2, 1, 1), ((3, 3), (2, 2), (1, 1), (1, 1)), (3, 1, 2, 2), (5, 2, 1, 2),
    (3, 1, 4, None),
])
def test_output_size_and_geometry_match_the_conv(kernel_size, stride, dilation, padding):
    layer = build_acmix_conv(8, 12, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, bias=False, head=3)
    k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
    d = dilation if isinstance(dilation, int) else dilation[0]
    conv = nn.Conv2d(8, 12, kernel_size, stride=stride, padding=d * (k - 1) // 2,
                     dilation=dilation)
    assert layer.kernel_conv == k and layer.kernel_att == 7 and layer.head == 3
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                 'groups', 'transposed', 'output_padding'):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 8, 15, 18)
    assert layer(x).shape == conv(x).shape


def test_acmix_keys_and_parameter_names():
    layer = build_acmix_conv(16, 16, 3, padding=1, kernel_att=5, head=2, attn_impl='lean')
    assert (layer.kernel_att, layer.head, layer.attn_impl) == (5, 2, 'lean')
    reference = ACMix(16, 16, kernel_att=5, head=2)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()]
    # bias=True and bias=False give the same layer (documented in ACMixConv2d)
    assert list(build_acmix_conv(16, 16, 3, bias=True).state_dict()) == list(
        build_acmix_conv(16, 16, 3, bias=False).state_dict())
    assert layer.bias is None and isinstance(layer.dep_conv, ShiftConv2d)


def test_a_1x1_kernel_builds_a_plain_conv():
    conv = build_acmix_conv(8, 16, 1, bias=True)
    assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    assert conv.bias is not None and conv.weight.shape == (16, 8, 1, 1)
    assert type(build_acmix_conv(8, 16, (1, 1), stride=2, bias=False)) is nn.Conv2d


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(kernel_size=3, padding=0), ValueError,
     'padding=0 would not give the output size of the conv it replaces; ACMix outputs '
     'ceil(H / stride), which a conv gets with padding = dilation * (kernel_size - 1) // 2 = 1 '
     'here (kernel_size=3, dilation=1). Allowed: None or 1'),
    (dict(kernel_size=3, dilation=2, padding=1), ValueError, 'Allowed: None or 2'),
    (dict(kernel_size=3, padding=1, groups=32), ValueError,
     "groups=32 is not supported; allowed: 1. ACMix replaces a dense conv"),
    (dict(kernel_size=4), ValueError, 'kernel_size must be odd and positive'),
    (dict(kernel_size=(3, 5)), ValueError,
     'kernel_size must be an int or a pair of equal ints (ACMix is square), got (3, 5)'),
    (dict(kernel_size=3, stride=(1, 2)), ValueError, 'stride must be an int or a pair'),
    (dict(kernel_size=3, bias='yes'), ValueError, "bias must be True or False, got 'yes'"),
    (dict(kernel_size=3, kernal_att=5), TypeError,
     "conv layer ACMix got unknown key 'kernal_att' (did you mean 'kernel_att'?); allowed: "
     'in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, '
     'kernel_att, head, attn_impl'),
    (dict(kernel_size=3, head=5), ValueError, 'out_channels (16) must be divisible by head (5)'),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error) as info:
        build_acmix_conv(16, 16, **kwargs)
    assert message in str(info.value)


# --------------------------------------------------------------------------- ConvModule
def test_convmodule_reads_a_convs_attributes():
    from mmcv.cnn import ConvModule
    kwargs = dict(stride=2, padding=1, norm_cfg=dict(type='BN'))
    stock = ConvModule(16, 32, 3, **kwargs)
    acmix = ConvModule(16, 32, 3, conv_cfg=dict(type='acmix_mm.ACMix'), **kwargs)
    assert isinstance(acmix.conv, ACMixConv2d)
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                 'groups', 'transposed', 'output_padding'):
        assert getattr(acmix, attr) == getattr(stock, attr), attr
    assert not acmix.with_bias and acmix.conv.bias is None  # bias='auto' with a norm: False
    acmix.init_weights()  # ConvModule's kaiming skips a conv with its own init_weights
    assert_acmix_init(acmix.conv)
    x = torch.randn(2, 16, 13, 17)
    assert acmix(x).shape == stock(x).shape == (2, 32, 7, 9)


def test_fpn_output_convs_keep_the_shift_init_through_xavier():
    """FPN(conv_cfg=ACMix): 1x1 laterals stay convs, 3x3 outputs become ACMix; FPN's
    Xavier(layer='Conv2d') init reaches the ACMix 1x1 projections but not the shift kernel."""
    torch.manual_seed(0)
    fpn = build('mmdet', dict(type='FPN', in_channels=[16, 32], out_channels=16, num_outs=2,
                              conv_cfg=dict(type='acmix_mm.ACMix', head=2)))
    assert all(type(c.conv) is nn.Conv2d for c in fpn.lateral_convs)
    assert all(type(c.conv) is ACMixConv2d for c in fpn.fpn_convs)
    q_before = fpn.fpn_convs[0].conv.conv1.weight.clone()
    fpn.init_weights()
    layer = fpn.fpn_convs[0].conv
    assert not torch.equal(layer.conv1.weight, q_before)  # Xavier reached the 1x1 convs
    for conv in fpn.fpn_convs:
        assert_acmix_init(conv.conv)
    outs = fpn([torch.randn(1, 16, 16, 16), torch.randn(1, 32, 8, 8)])
    assert [o.shape for o in outs] == [(1, 16, 16, 16), (1, 16, 8, 8)]


def test_decode_head_3x3_convs():
    head = build('mmseg', dict(type='FCNHead', in_channels=16, channels=16, num_convs=2,
                               concat_input=False, num_classes=3, norm_cfg=dict(type='BN'),
                               conv_cfg=dict(type='acmix_mm.ACMix', head=2)))
    assert [type(c.conv) for c in head.convs] == [ACMixConv2d, ACMixConv2d]
    assert type(head.conv_seg) is nn.Conv2d  # built by nn.Conv2d, not by conv_cfg
    head.init_weights()
    assert_acmix_init(head.convs[0].conv)
    assert head([torch.randn(2, 16, 12, 12)]).shape == (2, 3, 12, 12)


# --------------------------------------------------------------------------- stock backbones
STOCK = {
    'mmdet-ResNet50': ('mmdet', dict(type='ResNet', depth=50), 13),
    'mmdet-ResNeXt50-groups1': ('mmdet', dict(type='ResNeXt', depth=50, groups=1, base_width=64),
                                13),
    'mmseg-ResNetV1c50': ('mmseg', dict(type='ResNetV1c', depth=50), 13),
    'mmseg-ResNetV1d50': ('mmseg', dict(type='ResNetV1d', depth=50), 13),
    # PSPNet / DeepLabV3 -d8: stages 3 and 4 dilated by 2 and 4 instead of strided.
    'mmseg-ResNetV1c50-d8': ('mmseg', dict(type='ResNetV1c', depth=50, strides=(1, 2, 1, 1),
                                           dilations=(1, 1, 2, 4), contract_dilation=True), 13),
}


@pytest.mark.parametrize('name', list(STOCK))
def test_stock_backbone_builds_trains_and_predicts(name):
    scope, cfg, n_acmix = STOCK[name]
    torch.manual_seed(0)
    # zero_init_residual=False: with the last norm of each block at zero, no gradient would reach
    # the ACMix layers in this one step.
    stock = build(scope, dict(cfg, norm_eval=False))
    model = build(scope, dict(cfg, norm_eval=False, zero_init_residual=False, dcn=DCN,
                              stage_with_dcn=C3_C5))
    model.init_weights()
    layers = acmix_layers(model)
    assert len(layers) == n_acmix and not any(n.startswith('layer1.') for n in layers)
    for layer in layers.values():
        assert_acmix_init(layer)  # survived the ResNet's Kaiming init
    if 'd8' in name:
        assert model.layer4[1].conv2.dilation == (4, 4) and model.layer3[1].conv2.dilation == (2, 2)
        assert model.layer4[0].conv2.dilation == (2, 2)  # contract_dilation: first block halved
    x = torch.randn(2, 3, 64, 64)
    model.train()
    outs = model(x)
    assert [o.shape for o in outs] == [o.shape for o in stock(x)]
    loss = sum(o.float().pow(2).mean() for o in outs)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    first = next(iter(layers.values()))
    for param in (first.rate1, first.conv1.weight, first.dep_conv.weight, first.fc.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0
    before = first.dep_conv.weight.clone()
    optim.step()
    assert not torch.equal(before, first.dep_conv.weight)
    model.eval()
    with torch.no_grad():
        preds = model(x)
    assert all(torch.isfinite(p).all() for p in preds)


def test_resnext_grouped_conv_is_refused():
    with pytest.raises(ValueError, match=r'groups=32 is not supported; allowed: 1\. ACMix '
                                         r'replaces a dense conv.*ResNeXt'):
        build('mmdet', dict(type='ResNeXt', depth=50, groups=32, base_width=4, dcn=DCN,
                            stage_with_dcn=C3_C5))


def test_fallback_on_stride_keeps_strided_convs():
    model = build('mmdet', dict(type='ResNet', depth=50, stage_with_dcn=C3_C5,
                                dcn=dict(type='acmix_mm.ACMix', fallback_on_stride=True)))
    assert type(model.layer2[0].conv2) is nn.Conv2d  # the first stride-2 block
    assert type(model.layer2[1].conv2) is ACMixConv2d
    # mmdet's Bottleneck pops the key from the dict that all blocks share, so the later strided
    # blocks no longer see it: mmdet's behaviour for DCN too (docs/acmix-layer.md).
    assert type(model.layer3[0].conv2) is ACMixConv2d


# --------------------------------------------------------------------------- FLOPs
def test_flops_count_acmix_layers_in_a_stock_resnet_in_closed_form():
    model = build('mmdet', dict(type='ResNet', depth=50, dcn=DCN, stage_with_dcn=C3_C5))
    model.eval()
    report = count_flops(model, (torch.randn(1, 3, 64, 64),))
    layers = acmix_layers(model)
    assert sorted(report.handled) == sorted(layers)
    # stage 2 starts at 16x16 (stride 4); its first block has stride 2, and so on.
    inputs = {'layer2.0.conv2': (128, 16), 'layer2.1.conv2': (128, 8),
              'layer3.0.conv2': (256, 8), 'layer3.5.conv2': (256, 4),
              'layer4.0.conv2': (512, 4), 'layer4.2.conv2': (512, 2)}
    for name, (c, side) in inputs.items():
        stride = 2 if name.endswith('.0.conv2') else 1
        assert report.handled[name] == sum(acmix_flops_breakdown(
            c, c, side, side, stride=stride).values()), name
    assert report.flops == report.traced_flops + report.handled_flops
