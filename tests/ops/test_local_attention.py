"""The local-attention kernels: correctness, gradients, padding, and the lean path's memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from acmix_mm.ops import ACMix
from acmix_mm.ops.local_attention import (lean_local_attention, local_attention, reflect_index,
                                          reflect_pad, unfold_local_attention)


def _operands(lead=(2, 1), d=3, dv=2, h=4, w=5, stride=1, dtype=torch.float64, seed=0):
    """q (at the strided positions), k, v, q_pos, coord_x, coord_y."""
    gen = torch.Generator().manual_seed(seed)
    h_out, w_out = -(-h // stride), -(-w // stride)
    q = torch.randn(*lead, d, h_out, w_out, dtype=dtype, generator=gen)
    k = torch.randn(*lead, d, h, w, dtype=dtype, generator=gen)
    v = torch.randn(*lead, dv, h, w, dtype=dtype, generator=gen)
    q_pos = torch.randn(*lead, 2, h_out, w_out, dtype=dtype, generator=gen)
    coord_x = torch.rand(w, dtype=dtype, generator=gen)
    coord_y = torch.rand(h, dtype=dtype, generator=gen)
    return q, k, v, q_pos, coord_x, coord_y


def _brute_force(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
    """Loops over every query and window position, padding with numpy: the definition."""
    pad = dilation * (kernel - 1) // 2
    widths = [(0, 0)] * (k.dim() - 2) + [(pad, pad)] * 2
    k_pad = torch.from_numpy(np.pad(k.numpy(), widths, mode='reflect'))
    v_pad = torch.from_numpy(np.pad(v.numpy(), widths, mode='reflect'))
    cx = torch.from_numpy(np.pad(coord_x.numpy(), pad, mode='reflect'))
    cy = torch.from_numpy(np.pad(coord_y.numpy(), pad, mode='reflect'))
    h_out, w_out = q.shape[-2:]
    out = torch.zeros(*v.shape[:-2], h_out, w_out, dtype=torch.float64)
    for y in range(h_out):
        for x in range(w_out):
            logits, vals = [], []
            for ty in range(kernel):
                for tx in range(kernel):
                    py, px = y * stride + ty * dilation, x * stride + tx * dilation
                    logits.append(scale * (q[..., y, x] * k_pad[..., py, px]).sum(-1)
                                  + q_pos[..., 0, y, x] * cx[px] + q_pos[..., 1, y, x] * cy[py])
                    vals.append(v_pad[..., py, px])
            attn = torch.stack(logits, -1).softmax(-1)
            out[..., y, x] = sum(attn[..., t:t + 1] * vals[t] for t in range(len(vals)))
    return out


@pytest.mark.parametrize('impl', ['unfold', 'lean'])
@pytest.mark.parametrize('kernel,dilation,stride,size', [
    (3, 1, 1, (4, 5)), (3, 2, 2, (5, 4)), (5, 1, 3, (7, 5)), (1, 1, 1, (3, 2)),
    (7, 1, 1, (2, 3)), (7, 1, 2, (1, 3)),  # pads larger than the map
])
def test_matches_brute_force(impl, kernel, dilation, stride, size):
    ops = _operands(h=size[0], w=size[1], stride=stride)
    out = local_attention(*ops, kernel, dilation, stride, scale=0.7, impl=impl)
    torch.testing.assert_close(out, _brute_force(*ops, kernel, dilation, stride, 0.7))


@pytest.mark.parametrize('fn', [unfold_local_attention, lean_local_attention])
@pytest.mark.parametrize('kernel,dilation,stride', [(3, 1, 1), (3, 2, 2)])
def test_gradcheck_float64(fn, kernel, dilation, stride):
    q, k, v, q_pos, cx, cy = _operands(lead=(1,), d=2, dv=2, h=3, w=4, stride=stride)
    inputs = [t.requires_grad_() for t in (q, k, v, q_pos)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, p: fn(a, b, c, p, cx, cy, kernel, dilation, stride, 0.8), inputs)


@pytest.mark.parametrize('stride', [1, 2])
def test_lean_equals_unfold_forward_and_backward(stride):
    ops = _operands(lead=(2, 3), d=6, dv=4, h=13, w=12, stride=stride, dtype=torch.float32)
    results = []
    for fn in (unfold_local_attention, lean_local_attention):
        leaves = [t.detach().clone().requires_grad_() for t in ops[:4]]
        out = fn(*leaves, *ops[4:], 7, 1, stride, 0.5)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_lean_backward_only_for_requested_inputs():
    q, k, v, q_pos, cx, cy = _operands()
    v.requires_grad_()
    lean_local_attention(q, k, v, q_pos, cx, cy, 3).sum().backward()
    assert v.grad is not None and q.grad is None and k.grad is None


@pytest.mark.parametrize('size,pad', [(1, 3), (2, 3), (3, 3), (3, 7), (5, 3), (8, 3), (4, 0)])
def test_reflect_index_is_numpys_repeated_reflection(size, pad):
    expected = np.pad(np.arange(size), pad, mode='reflect')
    assert reflect_index(size, pad).tolist() == expected.tolist()


def test_reflect_pad_equals_torch_reflection_where_defined():
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(reflect_pad(x, 3),
                               torch.nn.functional.pad(x, [3, 3, 3, 3], mode='reflect'))


def test_bad_operands_raise():
    q, k, v, q_pos, cx, cy = _operands()
    with pytest.raises(ValueError, match='expected q'):
        lean_local_attention(q, k[..., :-1], v[..., :-1], q_pos, cx, cy, 3)
    with pytest.raises(ValueError, match='coord_x / coord_y must be'):
        lean_local_attention(q, k, v, q_pos, cy, cx, 3)
    with pytest.raises(ValueError, match='kernel must be a positive odd int, got 4'):
        unfold_local_attention(q, k, v, q_pos, cx, cy, 4)
    with pytest.raises(ValueError, match='impl must be one of'):
        local_attention(q, k, v, q_pos, cx, cy, 3, impl='flash')
    with pytest.raises(ValueError, match='pad must be >= 0'):
        reflect_index(4, -1)


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward of model(x)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize('stride', [1, 2])
def test_lean_saves_far_less_for_backward_than_unfold(stride):
    torch.manual_seed(0)
    x = torch.randn(1, 64, 24, 24, requires_grad=True)
    lean = ACMix(64, 64, stride=stride, attn_impl='lean')
    unfold = ACMix(64, 64, stride=stride, attn_impl='unfold')
    lean_bytes, unfold_bytes = _saved_bytes(lean, x), _saved_bytes(unfold, x)
    input_bytes = x.numel() * x.element_size()
    # A few input-sized tensors (x, qkv, the conv branch's, 49*head/C for the attention
    # weights), not ~49 per tensor. At stride 2 the unfold path only keeps the strided windows.
    assert lean_bytes <= 12 * input_bytes, lean_bytes / input_bytes
    assert lean_bytes * (8 if stride == 1 else 3) <= unfold_bytes, (lean_bytes, unfold_bytes)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize('impl,materialises', [('lean', False), ('unfold', True)])
def test_lean_never_materialises_windows(impl, materialises):
    torch.manual_seed(0)
    b, c, h, w = 1, 16, 12, 12
    model = ACMix(c, c, attn_impl=impl)
    x = torch.randn(b, c, h, w, requires_grad=True)
    mode = _LargestTensor()
    with mode:
        model(x).sum().backward()
    window_tensor = b * c * 49 * h * w  # (B, C, 49, H, W)
    assert (mode.largest >= window_tensor) == materialises, mode.largest
