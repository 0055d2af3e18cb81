"""ACMix's convolution branch: the C++ kernel against F.conv2d, its choice by 'auto', its errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from acmix_mm.ops import ACMix, cpp_extension
from acmix_mm.ops.cpp_shift import cpp_shift_conv, resolve_conv_impl, shift_conv

# (batch, groups, in per group, out per group, H, W, kernel, stride, dilation): ACMix's own
# shape (12 -> 4 a group), odd and tiny maps, strides up to 4, dilation, kernels 1 and 5, and
# a map narrower than a register block.
GEOMETRIES = [
    (2, 3, 12, 4, 7, 9, 3, 1, 1),
    (1, 2, 12, 4, 8, 11, 3, 2, 1),
    (2, 2, 12, 4, 9, 7, 3, 3, 2),
    (1, 2, 5, 3, 5, 6, 5, 1, 2),
    (1, 4, 12, 4, 15, 37, 3, 2, 1),
    (1, 1, 3, 2, 1, 1, 3, 1, 1),
    (1, 2, 3, 4, 1, 2, 3, 3, 2),
    (1, 2, 3, 4, 2, 1, 5, 4, 1),
    (1, 2, 4, 5, 3, 3, 1, 2, 1),
    (1, 2, 4, 6, 2, 3, 3, 2, 3),
]


def _operands(b, g, ci, co, h, w, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, g * ci, h, w, dtype=dtype, generator=gen, requires_grad=True)
    weight = torch.randn(g * co, ci, k, k, dtype=dtype, generator=gen, requires_grad=True)
    return x, weight


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: 'x'.join(map(str, g)))
def test_cpp_equals_conv2d_with_gradients(geometry):
    b, g, ci, co, h, w, k, s, d = geometry
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x, weight = _operands(b, g, ci, co, h, w, k, dtype)
        ref = F.conv2d(x, weight, None, s, d * (k // 2), d, g)
        out = cpp_shift_conv(x, weight, g, s, d)
        assert out.shape == ref.shape == (b, g * co, -(-h // s), -(-w // s))
        grad_out = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        ref_grads = torch.autograd.grad(ref, (x, weight), grad_out)
        grads = torch.autograd.grad(out, (x, weight), grad_out)
        # Relative to the largest value: sums of up to 500 float products.
        for got, want in ((out, ref),) + tuple(zip(grads, ref_grads)):
            scale = want.abs().max().item() or 1.0
            assert (got - want).abs().max().item() <= tol * scale, (dtype, got.shape)


@pytest.mark.parametrize('geometry', GEOMETRIES[:4] + GEOMETRIES[6:8],
                         ids=lambda g: 'x'.join(map(str, g)))
def test_cpp_gradcheck_float64(geometry):
    b, g, ci, co, h, w, k, s, d = geometry
    x, weight = _operands(b, g, ci, co, h, w, k, torch.float64)
    assert torch.autograd.gradcheck(lambda a, c: cpp_shift_conv(a, c, g, s, d), (x, weight))


def test_only_the_gradients_asked_for():
    x, weight = _operands(1, 2, 12, 4, 6, 6, 3, torch.float64)
    out = cpp_shift_conv(x.detach(), weight, 2)
    (grad_w,) = torch.autograd.grad(out.sum(), (weight,))
    want = torch.autograd.grad(F.conv2d(x.detach(), weight, None, 1, 1, 1, 2).sum(), (weight,))[0]
    torch.testing.assert_close(grad_w, want)


@pytest.mark.parametrize('stride', [1, 2])
def test_acmix_cpp_and_conv_impls_agree(stride):
    torch.manual_seed(0)
    layer = ACMix(32, 32, stride=stride, conv_impl='conv').double()
    # Away from the shift init, so that every fc/dep_conv weight matters.
    with torch.no_grad():
        layer.dep_conv.weight.normal_()
    x = torch.randn(2, 32, 11, 13, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for impl in ('conv', 'cpp'):
        layer.conv_impl = impl
        layer.zero_grad()
        out = layer(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in
                                         (layer.fc.weight, layer.dep_conv.weight,
                                          layer.conv1.weight, layer.rate2)])
        x.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_auto_picks_cpp_on_cpu_float_and_conv_elsewhere():
    assert cpp_extension.load_extension() is not None, cpp_extension.extension_error()
    assert resolve_conv_impl('auto', torch.zeros(1, dtype=torch.float32)) == 'cpp'
    assert resolve_conv_impl('auto', torch.zeros(1, dtype=torch.float64)) == 'cpp'
    assert resolve_conv_impl('auto', torch.zeros(1, dtype=torch.bfloat16)) == 'conv'
    assert resolve_conv_impl('auto', torch.zeros(1, dtype=torch.float16)) == 'conv'
    assert resolve_conv_impl('conv', torch.zeros(1)) == 'conv'
    # Half precision goes through F.conv2d and keeps its dtype.
    x = torch.randn(1, 24, 5, 5, dtype=torch.bfloat16)
    weight = torch.randn(8, 12, 3, 3)
    assert shift_conv(x, weight, 2).dtype == torch.bfloat16


def test_auto_picks_conv_while_tracing():
    layer = ACMix(8, 8, head=2).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        eager = layer(x)
    graph = str(traced.inlined_graph)
    # Traced: plain convolutions only (the custom op would not export); eager: the C++ kernel.
    assert 'shift_conv_cpp' not in graph and graph.count('aten::_convolution') == 2
    torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"conv_impl must be one of \('auto', 'conv', 'cpp'\), "
                                         r"got 'fast'"):
        ACMix(8, 8, conv_impl='fast')
    with pytest.raises(ValueError, match=r"shift conv impl must be one of .* got 'fast'"):
        resolve_conv_impl('fast', torch.zeros(1))
    x = torch.randn(1, 24, 5, 5)
    with pytest.raises(ValueError, match=r"impl 'cpp' needs CPU tensors of one dtype, float32 or "
                                         r"float64; got x torch.float16"):
        cpp_shift_conv(x.half(), torch.randn(8, 12, 3, 3).half(), 2)
    with pytest.raises(ValueError, match=r'groups=5 do not fit x \(1, 24, 5, 5\) and weight '
                                         r'\(8, 12, 3, 3\)'):
        cpp_shift_conv(x, torch.randn(8, 12, 3, 3), 5)
    with pytest.raises(ValueError, match=r'kernel must be square and odd, got \(8, 12, 2, 2\)'):
        cpp_shift_conv(x, torch.randn(8, 12, 2, 2), 2)
    with pytest.raises(ValueError, match=r'stride and dilation must be >= 1, got 0 and 1'):
        cpp_shift_conv(x, torch.randn(8, 12, 3, 3), 2, stride=0)
