"""ACMix-aware FLOPs: closed form vs. an independent count, tracer gap, models and configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.config import Config
from torch import nn

from acmix_mm.models.backbones.resnet_acmix import ResNetACMix
from acmix_mm.models.flops import (acmix_flops_breakdown, count_config_flops, count_flops,
                                   flop_handlers, register_flop_handler)
from acmix_mm.ops import ACMix

REPO = Path(__file__).resolve().parents[2]


def traced_macs(module: nn.Module, x: torch.Tensor) -> int:
    analyzer = FlopAnalyzer(module.eval(), (x,))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return int(analyzer.total())


def independent_acmix_macs(c_in: int, c: int, h: int, w: int, head: int, stride: int,
                           kernel_att: int = 7, kernel_conv: int = 3) -> int:
    """ACMix counted as the convolutions it is made of (measured by mmengine on real Conv2d
    modules of the same shapes) plus the attention written out per output element."""
    d = c // head
    x = torch.zeros(1, c_in, h, w)
    qkv = traced_macs(nn.Conv2d(c_in, 3 * c, 1), x)
    coords = traced_macs(nn.Conv2d(2, d, 1), torch.zeros(1, 2, h, w))
    fc = traced_macs(nn.Conv2d(3 * head, kernel_conv**2, 1, bias=False),
                     torch.zeros(1, 3 * head, d, h * w))
    dep = traced_macs(nn.Conv2d(kernel_conv**2 * d, c, kernel_conv, stride, kernel_conv // 2,
                                groups=d, bias=False), torch.zeros(1, kernel_conv**2 * d, h, w))
    queries = math.ceil(h / stride) * math.ceil(w / stride)
    window = kernel_att**2
    per_query_and_head = window * d + window + window * d  # logits, softmax, weighted sum
    return qkv + coords + fc + dep + queries * head * per_query_and_head


@pytest.mark.parametrize('c_in, c, h, w, head, stride', [
    (64, 64, 14, 14, 4, 1), (32, 64, 15, 17, 4, 2), (48, 96, 9, 12, 8, 1)])
def test_acmix_count_matches_independent_count(c_in, c, h, w, head, stride):
    layer = ACMix(c_in, c, head=head, stride=stride)
    report = count_flops(layer.eval(), (torch.randn(1, c_in, h, w),))
    expected = independent_acmix_macs(c_in, c, h, w, head, stride)
    assert abs(report.flops - expected) <= 0.05 * expected
    assert report.handled == {'': report.flops}  # the whole model is one handled ACMix
    assert report.params == sum(p.numel() for p in layer.parameters())


def analytical_acmix_macs(c_in: int, c: int, h: int, w: int, stride: int, head: int = 4,
                          kernel_att: int = 7, kernel_conv: int = 3) -> dict:
    """ACMix's multiply-accumulates written out by hand, per image, in the authors' convention:
    every module of their code counted as they run it (fc then dep_conv as two convs).

    Returns the total under two conventions for the shift branch:
    ``authors``: fc (1x1, 3*head -> k*k maps, on each of the d rows of the N input positions)
    then dep_conv (grouped k x k, k*k inputs per group, at the M output positions);
    ``as_run``: acmix_mm's single grouped conv with their product kernel (3*head inputs per
    group, k x k taps, at the M outputs), plus our attention's 2 extra positional dims.
    """
    d = c // head
    n = h * w                                           # input positions
    m = -(-h // stride) * -(-w // stride)              # output positions (ceil division)
    window = kernel_att * kernel_att                    # 49 keys per query
    taps = kernel_conv * kernel_conv                    # 9
    qkv = 3 * c_in * c * n                              # conv1, conv2, conv3 (1x1)
    positional = 2 * d * n                              # conv_p: 2 coordinates -> d, once
    logits = m * head * window * d                      # q . (k + pe_i - pe_j): d MACs per key
    softmax = m * head * window                         # one op per logit
    weighted_sum = m * head * window * d                # sum_j a_ij v_j
    fc = n * d * (3 * head) * taps                      # 1x1 over the 3*head stack
    dep_conv = m * c * taps * taps                      # k*k inputs per group, k*k taps
    fused = m * c * (3 * head) * taps                   # one grouped conv, product kernel
    extra_pos = m * head * window * 2 + m * head * d * 2  # [q, -W_p^T q] . [k, c]: 2 more dims
    attention = logits + softmax + weighted_sum
    return dict(authors=qkv + positional + attention + fc + dep_conv,
                as_run=qkv + attention + fused + extra_pos)


@pytest.mark.parametrize('c_in, c, h, w, stride', [
    (64, 64, 28, 28, 1), (64, 64, 29, 27, 2), (256, 256, 14, 14, 1), (256, 256, 15, 15, 2),
    (128, 256, 14, 14, 2)])
def test_acmix_count_matches_analytical_count(c_in, c, h, w, stride):
    """acmix_mm.models.flops counts an ACMix layer the authors' way (their modules: fc and
    dep_conv as two convs), within 5% of the hand count; what acmix_mm actually runs (fused
    shift conv, 2 extra dims per head in the logits) is within 5% too at stride 1, where
    3*head*k*k = 108 = k*k (fc) + k**4 (dep_conv) MACs per output channel for head 4, k 3, but
    below it at stride 2, where fc runs at every input position and the fused conv does not."""
    layer = ACMix(c_in, c, stride=stride).eval()
    report = count_flops(layer, (torch.randn(1, c_in, h, w),))
    hand = analytical_acmix_macs(c_in, c, h, w, stride)
    assert abs(report.flops - hand['authors']) <= 0.05 * hand['authors']
    if stride == 1:
        assert abs(hand['as_run'] - hand['authors']) <= 0.05 * hand['authors']
    else:
        assert hand['as_run'] < hand['authors']


def test_breakdown_terms_for_the_spec_layer():
    # in = out = 64, head 4, 8x8, stride 1: d = 16, N = M = 64, K = 49, k = 9.
    terms = acmix_flops_breakdown(64, 64, 8, 8)
    assert terms == {
        'qkv': 3 * 64 * 64 * 64,
        'conv_p': 2 * 16 * 64,
        'attn_logits': 64 * 64 * 49,
        'attn_softmax': 4 * 64 * 49,
        'attn_weighted_sum': 64 * 64 * 49,
        'fc': 12 * 9 * 16 * 64,
        'dep_conv': 64 * 64 * 81,
    }
    # Batch scales everything but the position map, which is shared by the batch.
    batch2 = acmix_flops_breakdown(64, 64, 8, 8, batch=2)
    assert batch2['conv_p'] == terms['conv_p']
    assert batch2['attn_logits'] == 2 * terms['attn_logits']


def test_in_a_network_only_the_acmix_part_is_replaced():
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        ACMix(32, 64, stride=2), nn.Conv2d(64, 16, 1)).eval()
    x = torch.randn(1, 3, 15, 15)
    report = count_flops(net, (x,))
    first = traced_macs(nn.Sequential(net[0], net[1]), x)
    last = traced_macs(net[4], torch.zeros(1, 64, 8, 8))
    acmix = independent_acmix_macs(32, 64, 15, 15, 4, 2)
    assert abs(report.flops - (first + acmix + last)) <= 0.05 * report.flops
    assert list(report.handled) == ['3']
    # The tracer alone misses the attention: logits + softmax + weighted sum + position conv.
    plain = traced_macs(net, x)
    terms = acmix_flops_breakdown(32, 64, 15, 15, stride=2)
    missed = terms['attn_logits'] + terms['attn_softmax'] + terms['attn_weighted_sum']
    assert report.flops - plain >= 0.95 * missed


def test_resnet_acmix26_matches_paper_flops_and_params():
    # Paper: ResNet-ACmix-26 2.3G FLOPs (multiply-accumulates) at 224x224, with its fc head.
    model = ResNetACMix(26).eval()
    report = count_flops(model, (torch.zeros(1, 3, 224, 224),))
    head_macs = 2048 * 1000
    assert abs(report.flops + head_macs - 2.3e9) <= 0.05 * 2.3e9
    assert report.params == 8_438_816
    assert len(report.handled) == sum((1, 2, 4, 1))


def test_custom_handler_and_errors():
    class Mystery(nn.Module):
        def forward(self, x):
            return x * 2

    @register_flop_handler(Mystery)
    def _count(module, inputs, output):
        return 7 * inputs[0].numel()

    try:
        net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), Mystery()).eval()
        report = count_flops(net, (torch.zeros(1, 1, 4, 4),))
        assert report.handled == {'1': 7 * 32}
        assert report.flops == 2 * 16 + 7 * 32
    finally:
        from acmix_mm.models import flops
        flops._HANDLERS.pop(Mystery)
    assert ACMix in flop_handlers() and Mystery not in flop_handlers()
    with pytest.raises(TypeError, match='nn.Module subclass'):
        register_flop_handler(int)
    with pytest.raises(TypeError, match='tuple of model arguments'):
        count_flops(net, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match='out_channels \\(10\\) must be divisible by head'):
        acmix_flops_breakdown(8, 10, 4, 4)


@pytest.mark.parametrize('name, scope_words', [
    ('retinanet_acmix-r50_fpn_1x_coco.py', 'det'),
    ('fpn_acmix-r50_4xb4-80k_ade20k-512x512.py', 'seg')])
def test_config_count_includes_backbone_and_heads(name, scope_words):
    cfg = Config.fromfile(str(REPO / 'configs/acmix_resnet' / name))
    report = count_config_flops(cfg, 64, 96)
    backbone = count_flops(ResNetACMix(50).eval(), (torch.zeros(1, 3, 64, 96),))
    assert report.handled_flops == backbone.handled_flops  # the same 16 ACMix layers
    assert report.flops > backbone.flops  # plus neck and heads
    assert report.params > backbone.params
    with pytest.raises(ValueError, match='height must be a positive int'):
        count_config_flops(cfg, 0, 128)


def test_get_flops_cli_defaults_and_errors():
    import importlib.util

    from acmix_mm.tool_models import default_input_shape
    spec = importlib.util.spec_from_file_location('get_flops', REPO / 'tools/get_flops.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    det = Config.fromfile(str(REPO / 'configs/acmix_resnet/retinanet_acmix-r50_fpn_1x_coco.py'))
    seg = Config.fromfile(str(REPO / 'configs/acmix_resnet/fpn_acmix-r50_4xb4-80k_ade20k-512x512.py'))
    # The tools' one default: 800 x 1333 padded to mmdet's size divisor of 32.
    assert default_input_shape(det) == (800, 1344)
    assert default_input_shape(seg) == (512, 512)
    with pytest.raises(FileNotFoundError, match='config file not found'):
        tool.main(['configs/does_not_exist.py'])
    with pytest.raises(SystemExit):
        tool.main([str(REPO / 'configs/acmix_resnet/retinanet_acmix-r50_fpn_1x_coco.py'),
                   '--shape', '64'])
