"""ACMix's fused C++ path (both branches in one op, q_pos in the projection) against the
reference path (unfold attention, F.conv2d branch): outputs and every gradient, gradcheck,
when it is taken, and its errors."""
from __future__ import annotations

import math

import pytest
import torch

from acmix_mm.ops import ACMix
from acmix_mm.ops.cpp_fused import cpp_acmix_branches, split_projection

# (batch, channels, H, W, stride, dilation, kernel_att, head): ACMix's defaults, strides 2-3 on
# odd sizes, dilation, maps of 1-3 px, a 5x5 window and 2 heads.
GEOMETRIES = [
    (2, 16, 9, 11, 1, 1, 7, 4),
    (2, 16, 9, 11, 2, 1, 7, 4),
    (1, 8, 5, 7, 2, 2, 7, 4),
    (2, 16, 13, 10, 1, 2, 7, 4),
    (3, 16, 1, 3, 2, 1, 7, 4),
    (1, 12, 8, 6, 3, 1, 5, 2),
]


def _layer(c, s, d, kernel_att, head, dtype, seed=0):
    torch.manual_seed(seed)
    layer = ACMix(c, c, kernel_att=kernel_att, head=head, stride=s, dilation=d).to(dtype)
    with torch.no_grad():
        # Away from the init's special values: rates differ, a random (not shift) dep_conv,
        # and position weights large enough to matter in the softmax.
        layer.rate1.fill_(0.7)
        layer.rate2.fill_(-0.3)
        layer.dep_conv.weight.normal_()
        layer.conv_p.weight.mul_(5)
    return layer


def _run(layer, x, grad_out, attn_impl, conv_impl):
    layer.attn_impl, layer.conv_impl = attn_impl, conv_impl
    x = x.detach().requires_grad_()
    out = layer(x)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x] + params, grad_out, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(p) if g is None else g
                             for g, p in zip(grads, [x] + params)]


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: 'x'.join(map(str, g)))
def test_fused_equals_reference_with_every_gradient(geometry):
    b, c, h, w, s, d, kernel_att, head = geometry
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        layer = _layer(c, s, d, kernel_att, head, dtype)
        x = torch.randn(b, c, h, w, dtype=dtype, generator=torch.Generator().manual_seed(1))
        assert layer._fused_branches(x)
        grad_out = torch.randn(b, c, -(-h // s), -(-w // s), dtype=dtype,
                               generator=torch.Generator().manual_seed(2))
        fused = _run(layer, x, grad_out, 'auto', 'auto')
        reference = _run(layer, x, grad_out, 'unfold', 'conv')
        names = ['out', 'x'] + [name for name, _ in layer.named_parameters()]
        for name, got, want in zip(names, fused, reference):
            scale = want.abs().max().item() or 1.0
            assert (got - want).abs().max().item() <= tol * scale, (dtype, name)
        # conv_p's bias cancels in the softmax, in the fused path too.
        assert fused[names.index('conv_p.bias')].abs().max().item() == 0.0


@pytest.mark.parametrize('geometry', [GEOMETRIES[1], GEOMETRIES[2], GEOMETRIES[5]],
                         ids=lambda g: 'x'.join(map(str, g)))
def test_fused_gradcheck_float64(geometry):
    b, c, h, w, s, d, kernel_att, head = geometry
    layer = _layer(c, s, d, kernel_att, head, torch.float64)
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    assert layer._fused_branches(x)
    assert torch.autograd.gradcheck(layer, (x,))
    # The op itself, in every differentiable input (projection, kernel, rate1).
    proj = torch.randn(b, 3 * c + 2 * head, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 3 * head, 3, 3, dtype=torch.float64, requires_grad=True)
    rate1 = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    coord_x = torch.linspace(-1, 1, w, dtype=torch.float64)
    coord_y = torch.linspace(-1, 1, h, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, k, r: cpp_acmix_branches(p, k, r, coord_x, coord_y, head, kernel_att, d, s,
                                           (c // head) ** -0.5),
        (proj, weight, rate1))


def test_fused_is_taken_only_where_both_kernels_are_cpp():
    layer = ACMix(16, 16)
    x = torch.randn(1, 16, 8, 8)
    assert layer._fused_branches(x)
    assert not layer._fused_branches(x.half())
    for attn_impl, conv_impl in (('lean', 'auto'), ('auto', 'conv'), ('unfold', 'cpp')):
        layer.attn_impl, layer.conv_impl = attn_impl, conv_impl
        assert not layer._fused_branches(x), (attn_impl, conv_impl)
    layer.attn_impl = layer.conv_impl = 'auto'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not layer._fused_branches(x)
        assert layer(x).dtype == torch.bfloat16


def test_split_projection_views():
    b, head, dim, h, w = 2, 4, 3, 5, 6
    proj = torch.arange(b * (3 * head * dim + 2 * head) * h * w, dtype=torch.float64).view(
        b, -1, h, w)
    q, k, v, q_pos = split_projection(proj, head, 2)
    assert q.shape == (b, head, dim, 3, 3) and k.shape == v.shape == (b, head, dim, h, w)
    assert q_pos.shape == (b, head, 2, 3, 3)
    # Channel d * 3*head + j is row d of stack entry j (q heads, then k, then v).
    assert torch.equal(k[1, 2, 1], proj[1, 1 * 3 * head + head + 2])
    assert torch.equal(v[0, 3, 2], proj[0, 2 * 3 * head + 2 * head + 3])
    assert torch.equal(q[1, 0, 0], proj[1, 0, ::2, ::2])
    assert torch.equal(q_pos[0, 1, 1], proj[0, 3 * head * dim + 3, ::2, ::2])
    for view in (q, k, v, q_pos):  # views, no copies
        assert view.untyped_storage().data_ptr() == proj.untyped_storage().data_ptr()


def test_fused_keeps_only_the_projection_between_forward_and_backward():
    # Saved for backward: the input (by the projection), its weights, the projection, the
    # branch kernel, rate1 and the coordinates; neither an attention map for rate1 nor the
    # (B, head, 49, H, W) attention weights, which the backward recomputes.
    layer = ACMix(16, 16)
    x = torch.randn(1, 16, 10, 12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        layer(x)
    assert (1, 3 * 16 + 2 * 4, 10, 12) in saved
    numels = sorted(math.prod(shape) for shape in saved)
    # Map-sized: the input (16 channels, in whatever view the projection keeps it) and the
    # projection (56 channels); the weights would be 4 * 49 channels.
    assert [n for n in numels if n >= 16 * 120] == [16 * 120, 56 * 120], saved


def test_recomputed_weights_give_the_same_bits_as_kept_ones():
    # The fused op's backward recomputes the attention weights instead of keeping them: the
    # recomputation must give the forward's weights to the bit.
    from acmix_mm.ops import cpp_extension
    ext = cpp_extension.load_extension()
    gen = torch.Generator().manual_seed(3)
    proj = torch.randn(2, 3 * 16 + 8, 9, 11, generator=gen)
    q, k, v, q_pos = split_projection(proj, 4, 1)
    cx, cy = torch.linspace(-1, 1, 11), torch.linspace(-1, 1, 9)
    out, kept = ext.forward(q, k, v, q_pos, cx, cy, 7, 1, 1, 0.5)
    assert torch.equal(ext.attention_weights(q, k, v, q_pos, cx, cy, 7, 1, 1, 0.5), kept)


def test_fused_op_errors_name_the_operands():
    proj = torch.randn(1, 3 * 8 + 8, 5, 5)
    weight = torch.randn(8, 12, 3, 3)
    rate1 = torch.ones(1)
    cx = torch.linspace(-1, 1, 5)
    with pytest.raises(RuntimeError, match='coord_x / coord_y'):
        cpp_acmix_branches(proj, weight, rate1, cx, torch.linspace(-1, 1, 4), 4, 7, 1, 1, 1.0)
    with pytest.raises(RuntimeError, match='groups'):
        cpp_acmix_branches(proj, weight[:, :6], rate1, cx, cx, 4, 7, 1, 1, 1.0)
