"""The local-attention kernels: correctness, gradients, padding, and the lean path's memory."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from acmix_mm.ops import ACMix, cpp_extension
from acmix_mm.ops.cpp_attention import cpp_local_attention
from acmix_mm.ops.lean_attention import lean_local_attention
from acmix_mm.ops.local_attention import (local_attention, resolve_attn_impl,
                                          unfold_local_attention)
from acmix_mm.ops.window import reflect_index, reflect_pad

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.mark.parametrize('impl', ['unfold', 'lean', 'cpp'])
@pytest.mark.parametrize('kernel,dilation,stride,size', [
    (3, 1, 1, (4, 5)), (3, 2, 2, (5, 4)), (5, 1, 3, (7, 5)), (1, 1, 1, (3, 2)),
    (7, 1, 1, (2, 3)), (7, 1, 2, (1, 3)),  # pads larger than the map
])
def test_matches_brute_force(impl, kernel, dilation, stride, size):
    ops = _operands(h=size[0], w=size[1], stride=stride)
    out = local_attention(*ops, kernel, dilation, stride, scale=0.7, impl=impl)
    torch.testing.assert_close(out, _brute_force(*ops, kernel, dilation, stride, 0.7))


@pytest.mark.parametrize('fn', [unfold_local_attention, lean_local_attention,
                                cpp_local_attention])
@pytest.mark.parametrize('kernel,dilation,stride', [(3, 1, 1), (3, 2, 2)])
def test_gradcheck_float64(fn, kernel, dilation, stride):
    q, k, v, q_pos, cx, cy = _operands(lead=(1,), d=2, dv=2, h=3, w=4, stride=stride)
    inputs = [t.requires_grad_() for t in (q, k, v, q_pos)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, p: fn(a, b, c, p, cx, cy, kernel, dilation, stride, 0.8), inputs)


@pytest.mark.parametrize('fn', [lean_local_attention, cpp_local_attention])
@pytest.mark.parametrize('stride', [1, 2])
def test_equals_unfold_forward_and_backward(fn, stride):
    ops = _operands(lead=(2, 3), d=6, dv=4, h=13, w=12, stride=stride, dtype=torch.float32)
    results = []
    for impl_fn in (unfold_local_attention, fn):
        leaves = [t.detach().clone().requires_grad_() for t in ops[:4]]
        out = impl_fn(*leaves, *ops[4:], 7, 1, stride, 0.5)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('fn', [lean_local_attention, cpp_local_attention])
@pytest.mark.parametrize('wanted', [{'v'}, {'k'}, {'q'}, {'q_pos'}, {'k', 'q'}])
def test_backward_only_for_requested_inputs(fn, wanted):
    ops = _operands()
    leaves = dict(zip(['q', 'k', 'v', 'q_pos'], ops[:4]))
    for name in wanted:
        leaves[name].requires_grad_()
    fn(*leaves.values(), *ops[4:], 3).sum().backward()
    assert {name for name, t in leaves.items() if t.grad is not None} == wanted
    # each gradient equals the reference's
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in ops[:4]]
    unfold_local_attention(*ref, *ops[4:], 3).sum().backward()
    for (name, ours), theirs in zip(leaves.items(), ref):
        if name in wanted:
            torch.testing.assert_close(ours.grad, theirs.grad)


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


@pytest.mark.parametrize('impl', ['lean', 'cpp'])
@pytest.mark.parametrize('stride', [1, 2])
def test_lean_saves_far_less_for_backward_than_unfold(impl, stride):
    torch.manual_seed(0)
    x = torch.randn(1, 64, 24, 24, requires_grad=True)
    lean = ACMix(64, 64, stride=stride, attn_impl=impl)
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


@pytest.mark.parametrize('impl,materialises', [('lean', False), ('cpp', False),
                                                ('unfold', True)])
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


# --- the C++ kernel ('cpp') -------------------------------------------------------------------


@pytest.mark.parametrize('kernel,dilation,stride,size,lead,d,dv', [
    (7, 1, 1, (13, 11), (2, 3), 5, 3),  # odd sizes, D != Dv
    (7, 1, 2, (15, 9), (1, 4), 16, 16),  # stride 2 on odd sizes (W = 167 at stride 8, ...)
    (5, 1, 1, (6, 7), (3,), 4, 6),
    (3, 2, 1, (9, 10), (2, 2), 3, 2),  # dilation 2
    (3, 2, 2, (8, 9), (1, 1), 2, 5),
    (7, 2, 2, (11, 12), (1, 2), 4, 4),  # pad 6: larger than half the map
    (7, 1, 1, (1, 1), (2,), 3, 2),  # 1-3 px maps: pads larger than the map
    (7, 1, 2, (2, 3), (1, 1), 3, 3),
    (5, 1, 1, (3, 1), (1,), 2, 3),
    (7, 1, 1, (1, 40), (1,), 3, 3),  # longer than one 16-lane block, one row
    (3, 1, 3, (10, 37), (1,), 4, 2),  # stride 3
])
def test_cpp_equals_unfold_fp32(kernel, dilation, stride, size, lead, d, dv):
    ops = _operands(lead=lead, d=d, dv=dv, h=size[0], w=size[1], stride=stride,
                    dtype=torch.float32, seed=kernel + size[0])
    results = []
    for fn in (unfold_local_attention, cpp_local_attention):
        leaves = [t.detach().clone().requires_grad_() for t in ops[:4]]
        out = fn(*leaves, *ops[4:], kernel, dilation, stride, 0.6)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, ours, ref in zip(['out', 'q', 'k', 'v', 'q_pos'], *results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize('kernel,dilation,stride,size', [(5, 1, 1, (4, 6)), (7, 1, 2, (3, 5)),
                                                         (3, 3, 2, (2, 1))])
def test_cpp_gradcheck_float64_more_geometries(kernel, dilation, stride, size):
    q, k, v, q_pos, cx, cy = _operands(lead=(2,), d=3, dv=2, h=size[0], w=size[1],
                                       stride=stride)
    inputs = [t.requires_grad_() for t in (q, k, v, q_pos)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, p: cpp_local_attention(a, b, c, p, cx, cy, kernel, dilation, stride, 0.9),
        inputs)


def test_cpp_non_contiguous_operands():
    """ACMix's layout: q/k/v are strided views of one (B, D, 3, head, H, W) projection, q
    subsampled [::2, ::2] (last-dim stride 2); here also a transposed map for k."""
    gen = torch.Generator().manual_seed(3)
    b, heads, d, h, w = 2, 3, 4, 9, 11
    qkv = torch.randn(b, d, 3, heads, h, w, generator=gen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4, 5).unbind(0)
    q = q[..., ::2, ::2]
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # x is now the strided dim
    q_pos = torch.randn(b, heads, 5, *q.shape[-2:], generator=gen)[:, :, 1:4:2]
    cx, cy = torch.linspace(-1, 1, w), torch.linspace(-1, 1, h)
    assert not any(t.is_contiguous() for t in (q, k, v, q_pos))
    args = (cx, cy, 7, 1, 2, 0.5)
    results = []
    for fn in (unfold_local_attention, cpp_local_attention):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, q_pos)]
        out = fn(*leaves, *args)
        out.backward(torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        results.append([out] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cpp_same_result_with_one_or_two_threads():
    ops = _operands(lead=(2, 2), d=8, dv=8, h=17, w=23, dtype=torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_() for t in ops[:4]]
            out = cpp_local_attention(*leaves, *ops[4:], 7, 1, 1, 0.3)
            out.backward(torch.ones_like(out))
            results.append([out] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):  # every output element is owned by one thread: bitwise equal
        assert torch.equal(one, two)


def test_cpp_bad_operands_raise():
    q, k, v, q_pos, cx, cy = _operands()
    with pytest.raises(ValueError, match="impl 'cpp' needs CPU tensors of one dtype, float32 or "
                                         'float64; got torch.float16'):
        cpp_local_attention(q.half(), k.half(), v.half(), q_pos.half(), cx.half(), cy.half(), 3)
    with pytest.raises(ValueError, match=r"impl 'cpp' needs .*torch.float32 on cpu, "
                                         r'torch.float64 on cpu'):
        cpp_local_attention(q.float(), k, v, q_pos, cx, cy, 3)
    with pytest.raises(ValueError, match='expected q'):
        cpp_local_attention(q, k[..., :-1], v[..., :-1], q_pos, cx, cy, 3)
    with pytest.raises(ValueError, match='kernel must be a positive odd int, got 2'):
        cpp_local_attention(q, k, v, q_pos, cx, cy, 2)


# --- 'auto' -------------------------------------------------------------------------------------


def test_resolve_auto_per_call():
    cpu32 = torch.zeros(1)
    assert resolve_attn_impl('auto', cpu32) == 'cpp'
    assert resolve_attn_impl('auto', cpu32.double()) == 'cpp'
    assert resolve_attn_impl('auto', cpu32.half()) == 'lean'  # no half kernel on CPU
    assert resolve_attn_impl('auto', cpu32.bfloat16()) == 'lean'
    for impl in ('unfold', 'lean', 'cpp', 'triton'):
        assert resolve_attn_impl(impl, cpu32) == impl  # explicit choices are kept
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'unfold', 'lean', "
                                         r"'cpp', 'triton'\), got 'fast'"):
        resolve_attn_impl('fast', cpu32)


def test_auto_is_unfold_under_jit_trace():
    """Tracing records plain tensor ops (the reference); the trace replays ACMix exactly."""
    torch.manual_seed(0)
    model = ACMix(8, 8, stride=2).eval()
    x = torch.randn(1, 8, 9, 10)
    seen = []

    def record(module, args, output):
        seen.append(resolve_attn_impl(module.attn_impl, args[0]))

    handle = model.register_forward_hook(record)
    traced = torch.jit.trace(model, x, check_trace=False)
    handle.remove()
    assert seen == ['unfold']
    graph = str(traced.inlined_graph)
    assert 'acmix_mm::local_attention_cpp' not in graph and 'index_select' in graph
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


_FALLBACK_SCRIPT = r"""
import warnings, torch
from acmix_mm.ops import ACMix, cpp_extension
from acmix_mm.ops.local_attention import resolve_attn_impl
x = torch.randn(1, 8, 6, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    impls = [resolve_attn_impl('auto', x) for _ in range(3)]
    out = ACMix(8, 8)(x)  # 'auto' runs (lean)
try:
    ACMix(8, 8, attn_impl='cpp')(x)
    error = None
except RuntimeError as exc:
    error = str(exc)
print(impls)
print(len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)][0])
print(error)
"""


@pytest.mark.parametrize('env,reason', [
    ({'ACMIX_MM_DISABLE_CPP': '1'}, 'disabled by ACMIX_MM_DISABLE_CPP'),
    ({'CXX': '/nonexistent/c++'}, 'not found'),  # no compiler: the build fails
])
def test_auto_falls_back_to_lean_with_one_warning(tmp_path, env, reason):
    full_env = dict(os.environ, ACMIX_MM_EXTENSIONS_DIR=str(tmp_path), **env)
    done = subprocess.run([sys.executable, '-c', _FALLBACK_SCRIPT], env=full_env, cwd=_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    impls, count, message, error = done.stdout.strip().splitlines()[-4:]
    assert impls == "['lean', 'lean', 'lean']"
    assert count == '1'
    assert 'C++ local-attention kernel is unavailable' in message and reason in message
    assert "uses the slower 'lean' kernel" in message
    assert error.startswith("local attention impl 'cpp': the C++ extension could not be built")
    assert reason in error


def test_extension_cache_name_tracks_torch_and_source():
    name = cpp_extension.extension_name()
    assert name.startswith('acmix_mm_cpu_kernels_' + torch.__version__.replace('.', '_')
                           .replace('+', '_'))
    assert cpp_extension.build_directory().endswith(name)
    assert cpp_extension.is_loaded()  # loaded by the tests above, not rebuilt
