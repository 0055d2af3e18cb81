"""The 'triton' local-attention kernel for CUDA: host code and autograd around Triton kernels.

Computes the function defined in :mod:`acmix_mm.ops.window` (operands and formula there; the
same as the 'unfold' reference of :mod:`acmix_mm.ops.local_attention`), forward and backward,
with the JIT kernels of :mod:`acmix_mm.ops.triton_kernels`: one forward launch (online
softmax) that saves only the softmax's log-sum-exp (..., H_out * W_out) besides its inputs
and output, never the (..., kernel**2, H_out, W_out) attention weights; a backward that
recomputes the weights, gathers the key-side gradients (no atomics) and folds the padded
map's gradient into its source pixels. So the backward is deterministic: the same inputs give
bitwise the same gradients.

Reflection padding uses index tables (:func:`acmix_mm.ops.window.reflect_index`),
so any map size works, 1 px included, and any odd kernel, dilation and stride.

Inputs may be float16, bfloat16, float32 (all computed in float32) or float64 (computed in
float64); all of q, k, v, q_pos and the coordinates must share the dtype and the device.
Any strides are accepted for the (up to two trailing) leading dims, channels and pixels, so
ACMix's q / k / v, which are permuted, strided views of one projection, are read in place.

Under ``torch.compile`` the call is a graph break (the kernels run eagerly). Selecting this
implementation for ACMix (``attn_impl``) is :mod:`acmix_mm.ops.local_attention`'s business.

Availability: Triton must be importable, and either CUDA present or Triton's interpreter
enabled (``TRITON_INTERPRET=1`` in the environment *before* this module is first imported;
it then runs the kernels on CPU tensors with numpy, slowly: for tests only). Where Triton is
not installed (a CPU-only machine) the module still imports: :func:`triton_available` is
False there and :func:`triton_local_attention` raises ``RuntimeError``.

Imports: only :mod:`acmix_mm.ops.window` and :mod:`acmix_mm.ops.triton_kernels` of this
package (the dispatcher imports this module, lazily, never the reverse).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch

from .window import check_operands, reflect_index, window_pad

try:  # Triton is optional: only the CUDA fast path needs it (none on a CPU-only machine).
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Read once, as Triton reads TRITON_INTERPRET (triton.knobs, Triton >= 3.4 as pinned):
# triton.jit decides at decoration (import) time between the compiler and the interpreter,
# so a later change of the variable does not affect these kernels.
_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)

if triton is not None:
    from . import triton_kernels as kernels

__all__ = ['triton_available', 'triton_local_attention', 'TRITON_DTYPES']

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available() -> bool:
    """True if :func:`triton_local_attention` can run here.

    That is: triton is importable and either CUDA is available or the kernels were defined
    under Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported).
    """
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


@functools.lru_cache(maxsize=64)
def _tables(size: int, pad: int, device: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Padding table (size + 2 * pad,) int32 and its inverse (size, max_count) int32.

    ``inverse[i, :n_i]`` are the padded positions that read pixel ``i`` (ascending), the rest
    -1; ``max_count`` is the largest ``n_i``. Cached: ACMix calls this with the same few sizes.
    """
    rows = reflect_index(size, pad)  # on CPU: built once per size
    counts = torch.bincount(rows, minlength=size)
    max_count = int(counts.max())
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel()) - starts[rows[order]]
    inverse = torch.full((size, max_count), -1, dtype=torch.int32)
    inverse[rows[order], rank] = order.to(torch.int32)
    return (rows.to(device=device, dtype=torch.int32), inverse.to(device), max_count)


def _as_5d(x: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> (L0, L1, C, H, W): a view where the strides allow it."""
    lead = x.shape[:-3]
    if len(lead) == 0:
        return x[None, None]
    if len(lead) == 1:
        return x[None]
    if len(lead) == 2:
        return x
    return x.reshape(-1, lead[-1], *x.shape[-3:])  # copies only if the leading dims can't merge


def _launch_config(d: int, dv: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_DV, BLOCK_P, num_warps) for D / Dv channels.

    Channel tiles are D and Dv padded to powers of two. The pixel tile is sized so that each
    (channels x pixels) tile holds about 16 values per thread: compiled for sm_90, the
    kernels spill no registers (the sm_90 compile test in
    tests/ops/test_triton_local_attention.py checks it with cuobjdump). float64 takes two
    registers a value, hence half the pixels.
    """
    block_d = max(triton.next_power_of_2(d), 2)
    block_dv = max(triton.next_power_of_2(dv), 2)
    widest = max(block_d, block_dv)
    num_warps = 4 if widest <= 32 else 8
    block_p = max(16, min(128, 512 * num_warps // widest))
    if dtype == torch.float64:
        block_p = max(16, block_p // 2)
    if _INTERPRET:  # numpy runs each program in turn: fewer, larger programs are faster
        block_p = 64
    return block_d, block_dv, block_p, num_warps


def _strides(x5: torch.Tensor) -> Tuple[int, ...]:
    return tuple(x5.stride())


class _TritonLocalAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, q_pos (as given), the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
        out_shape = (*v.shape[:-3], v.shape[-3], *q.shape[-2:])
        q5, k5, v5, p5 = _as_5d(q), _as_5d(k), _as_5d(v), _as_5d(q_pos)
        l0, l1, d, h_out, w_out = q5.shape
        dv, h, w = v5.shape[-3:]
        pad = window_pad(kernel, dilation)
        dev = str(q.device)
        rows, inv_rows, max_r = _tables(h, pad, dev)
        cols, inv_cols, max_c = _tables(w, pad, dev)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        cx = coord_x.to(cdt)[cols.long()].contiguous()
        cy = coord_y.to(cdt)[rows.long()].contiguous()
        scale_t = torch.full((1,), scale, dtype=cdt, device=q.device)
        n_lead, nq = l0 * l1, h_out * w_out
        out = torch.empty(n_lead, dv, nq, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_lead, nq, dtype=cdt, device=q.device)
        block_d, block_dv, block_p, num_warps = _launch_config(d, dv, cdt)
        n_pblocks = triton.cdiv(nq, block_p)
        # enable_fp_fusion (FMA) given explicitly: Triton 3.10 changes the default to off.
        with _on_device(q.device):
            kernels.fwd_kernel[(n_lead * n_pblocks,)](
                q5, k5, v5, p5, out, lse, rows, cols, cx, cy, scale_t,
                l1, d, dv, w_out, nq, n_pblocks, stride, dilation,
                *_strides(q5), *_strides(k5), *_strides(v5), *_strides(p5),
                KERNEL=kernel, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_P=block_p,
                CDT=kernels.TL_DTYPE[cdt], num_warps=num_warps, enable_fp_fusion=True)
        out = out.view(out_shape)
        ctx.save_for_backward(q, k, v, q_pos, out, lse, rows, cols, cx, cy, scale_t,
                              inv_rows, inv_cols)
        ctx.geometry = (kernel, dilation, stride, max_r, max_c)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not differentiable
    def backward(ctx, grad_out):
        (q, k, v, q_pos, out, lse, rows, cols, cx, cy, scale_t, inv_rows,
         inv_cols) = ctx.saved_tensors
        kernel, dilation, stride, max_r, max_c = ctx.geometry
        q5, k5, v5, p5 = _as_5d(q), _as_5d(k), _as_5d(v), _as_5d(q_pos)
        l0, l1, d, h_out, w_out = q5.shape
        dv, h, w = v5.shape[-3:]
        wp = cols.numel()
        n_lead, nq, n_pad = l0 * l1, h_out * w_out, rows.numel() * cols.numel()
        cdt = lse.dtype
        g = grad_out.reshape(n_lead, dv, nq).contiguous()
        out_flat = out.reshape(n_lead, dv, nq)
        block_d, block_dv, block_p, num_warps = _launch_config(d, dv, cdt)
        common = (rows, cols, cx, cy, scale_t)
        strides = (*_strides(q5), *_strides(k5), *_strides(v5), *_strides(p5))
        meta = dict(KERNEL=kernel, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_P=block_p,
                    CDT=kernels.TL_DTYPE[cdt], num_warps=num_warps, enable_fp_fusion=True)
        grad_q = torch.empty(n_lead, d, nq, dtype=q.dtype, device=q.device)
        grad_pos = torch.empty(n_lead, 2, nq, dtype=q_pos.dtype, device=q.device)
        delta = torch.empty(n_lead, nq, dtype=cdt, device=q.device)
        grad_k = grad_v = None
        with _on_device(q.device):
            n_qblocks = triton.cdiv(nq, block_p)
            kernels.bwd_query_kernel[(n_lead * n_qblocks,)](
                q5, k5, v5, p5, out_flat, g, lse, grad_q, grad_pos, delta, *common,
                l1, d, dv, w_out, nq, n_qblocks, stride, dilation, *strides, **meta)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                gk_pad = torch.empty(n_lead, d, n_pad, dtype=cdt, device=q.device)
                gv_pad = torch.empty(n_lead, dv, n_pad, dtype=cdt, device=q.device)
                n_kblocks = triton.cdiv(n_pad, block_p)
                kernels.bwd_key_kernel[(n_lead * n_kblocks,)](
                    q5, k5, v5, p5, g, lse, delta, gk_pad, gv_pad, *common,
                    l1, d, dv, h_out, w_out, wp, n_pad, n_kblocks, stride, dilation,
                    *strides, **meta)
                grad_k = _fold(gk_pad, inv_rows, inv_cols, max_r, max_c, (h, w), wp, k.dtype)
                grad_v = _fold(gv_pad, inv_rows, inv_cols, max_r, max_c, (h, w), wp, v.dtype)
                grad_k, grad_v = grad_k.view(k.shape), grad_v.view(v.shape)
        return (grad_q.view(q.shape), grad_k, grad_v, grad_pos.view(q_pos.shape),
                None, None, None, None, None, None)


def _fold(grad_pad: torch.Tensor, inv_rows: torch.Tensor, inv_cols: torch.Tensor, max_r: int,
          max_c: int, size: Tuple[int, int], wp: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, C, HP * WP) padded-map gradient -> (L, C, H, W) in ``dtype``, deterministically."""
    n = grad_pad.shape[0] * grad_pad.shape[1]
    h, w = size
    dst = torch.empty(*grad_pad.shape[:2], h, w, dtype=dtype, device=grad_pad.device)
    block = 256
    n_pblocks = triton.cdiv(h * w, block)
    kernels.fold_kernel[(n * n_pblocks,)](
        grad_pad, dst, inv_rows, inv_cols, w, h * w, wp, grad_pad.shape[-1], n_pblocks,
        MAX_R=max_r, MAX_C=max_c, BLOCK_P=block, CDT=kernels.TL_DTYPE[grad_pad.dtype],
        enable_fp_fusion=True)
    return dst


def _on_device(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()  # the interpreter's CPU tensors: no device to select


def triton_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                           kernel: int, dilation: int = 1, stride: int = 1,
                           scale: float = 1.0) -> torch.Tensor:
    """Local attention with Triton kernels: the function and shapes of
    :mod:`acmix_mm.ops.window` (see also the module docstring).

    Returns (..., Dv, H_out, W_out) in the inputs' dtype. Differentiable in q, k, v and q_pos.
    """
    if triton is None:
        raise RuntimeError('triton_local_attention: triton is not installed (pip install triton); '
                           "use impl='lean' instead")
    check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    tensors = {'q': q, 'k': k, 'v': v, 'q_pos': q_pos, 'coord_x': coord_x, 'coord_y': coord_y}
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f'triton_local_attention: dtype must be one of {TRITON_DTYPES}, got '
                         f'{q.dtype}')
    for name, tensor in tensors.items():
        if tensor.dtype != q.dtype:
            raise ValueError(f'triton_local_attention: all operands must share one dtype; q is '
                             f'{q.dtype} but {name} is {tensor.dtype}')
        if tensor.device != q.device:
            raise ValueError(f'triton_local_attention: all operands must be on one device; q is '
                             f'on {q.device} but {name} is on {tensor.device}')
    if q.device.type != 'cuda' and not _INTERPRET:
        raise RuntimeError(f'triton_local_attention: needs CUDA tensors, got device {q.device} '
                           '(or TRITON_INTERPRET=1 set before importing this module, for tests)')
    if q.device.type == 'cuda' and _INTERPRET:
        raise RuntimeError('triton_local_attention: the kernels were defined under '
                           'TRITON_INTERPRET=1, which runs on CPU tensors only; got device '
                           f'{q.device}')
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f'triton_local_attention: empty operands q {tuple(q.shape)}, '
                         f'v {tuple(v.shape)}')
    return _apply(q, k, v, q_pos, coord_x, coord_y, int(kernel), int(dilation), int(stride),
                  float(scale))


# Under torch.compile, dynamo would trace into the launches (and, with the interpreter, into
# numpy): a graph break here runs the kernels eagerly, forward and backward, as written.
@torch.compiler.disable
def _apply(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
    return _TritonLocalAttention.apply(q, k, v, q_pos, coord_x, coord_y, kernel, dilation,
                                       stride, scale)
