"""SwinACMix's conv branch: the fast channels-last paths equal the authors' literal form
(fc as a 1x1 conv over the 3*heads stack, then the grouped dep_conv), outputs and gradients."""
from __future__ import annotations

import pytest
import torch

from acmix_mm.models.backbones.swin_acmix import ACMixWindowAttention


def literal_conv_branch(m: ACMixWindowAttention, qkv: torch.Tensor, valid) -> torch.Tensor:
    """The authors' order of operations: (B, Hp, Wp, 3C) -> (B, Hp, Wp, C), NCHW in between."""
    B, Hp, Wp, _ = qkv.shape
    stack = qkv.permute(0, 3, 1, 2).reshape(B, 3 * m.num_heads, m.head_dim, Hp * Wp)
    taps = m.fc(stack)  # (B, 9, head_dim, Hp*Wp): nn.Conv2d 1x1 over the 3*heads axis
    taps = taps.permute(0, 2, 1, 3).reshape(B, 9 * m.head_dim, Hp, Wp)
    if valid is not None:
        taps = taps * valid
    return m.dep_conv(taps).permute(0, 2, 3, 1)


@pytest.mark.parametrize('dim, heads', [(12, 3), (8, 1), (24, 6), (48, 12)])
@pytest.mark.parametrize('padded', [False, True])
def test_conv_branch_matches_literal_form(dim, heads, padded):
    torch.manual_seed(0)
    m = ACMixWindowAttention(dim, heads, 7).double()
    with torch.no_grad():  # a bias and a kernel that are not the shift init
        m.fc.bias.normal_()
        m.dep_conv.weight.normal_()
    valid = None
    if padded:
        valid = torch.ones(9, 11, dtype=torch.float64)
        valid[-2:] = 0
        valid[:, -3:] = 0
    qkv = torch.randn(2, 9, 11, 3 * dim, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 9, 11, dim, dtype=torch.float64)
    results = []
    for fn in (literal_conv_branch, ACMixWindowAttention._convolution):
        for p in [qkv, m.fc.weight, m.fc.bias, m.dep_conv.weight]:
            p.grad = None
        out = fn(m, qkv, valid)
        out.backward(grad)
        results.append([out.detach(), qkv.grad, m.fc.weight.grad, m.fc.bias.grad,
                        m.dep_conv.weight.grad])
    for name, a, b in zip(('out', 'qkv', 'fc.weight', 'fc.bias', 'dep_conv.weight'), *results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), name
    # Fused path (one grouped conv) for few heads, fc then dep_conv otherwise.
    fused = 3 * heads * 9 <= 90
    assert fused == (heads <= 3)
