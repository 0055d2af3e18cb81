"""Sliding-window (local) dot-product attention kernels for ACMix.

ACMix's attention branch (Pan et al., "On the Integration of Self-Attention and Convolution",
CVPR 2022, arXiv:2111.14556) lets every query attend to the ``kernel x kernel`` window of
keys around it, with a relative-position term. The kernels here take (``...`` = any leading
dims, e.g. (batch, head)):

- ``q``: (..., D, H_out, W_out) queries at the output positions, H_out = ceil(H / stride);
- ``k``: (..., D, H, W) keys and ``v``: (..., Dv, H, W) values, *unpadded*;
- ``q_pos``: (..., 2, H_out, W_out) each query's weights on the key coordinates;
- ``coord_x``: (W,) and ``coord_y``: (H,) the key coordinates (constants).

The maps are extended by repeated reflection (:func:`reflect_index`) by
``pad = dilation * (kernel - 1) // 2``; the window of output position (y, x) is centred on
input position (y * stride, x * stride), its offset t = (ty, tx) (``t = ty * kernel + tx``)
reads padded position p_t = (y * stride + ty * dilation, x * stride + tx * dilation), and

    logit_t = scale * q . k[p_t] + q_pos[0] * coord_x[p_t] + q_pos[1] * coord_y[p_t]
    out     = sum_t softmax_t(logit) * v[p_t]                  (..., Dv, H_out, W_out)

Two implementations of the same function:

- ``'unfold'``: the straightforward reference. It stacks the kernel**2 shifted copies of the
  padded ``k`` and ``v`` (a (..., D, kernel**2, H_out, W_out) tensor each), which autograd
  keeps: ~2 * kernel**2 times the bytes of ``k`` are saved for backward.
- ``'lean'``: loops over the kernel**2 offsets, reading shifted *views* of the padded maps,
  inside a custom :class:`torch.autograd.Function` whose backward recomputes the padding.
  It saves only its inputs (no copies) and the attention weights (..., kernel**2, H_out,
  W_out), i.e. kernel**2 / D of the queries' bytes, and never materialises a
  (..., D, kernel**2, H_out, W_out) tensor, in forward or in backward.

- ``'cpp'``: a C++ CPU kernel (``csrc/local_attention.cpp``, built on first use by
  :mod:`acmix_mm.ops.cpp_extension`), float32/float64, multithreaded with torch's thread pool.
  Per output row it gathers the key/value rows of the window once and runs the dot products
  vectorised over x; it saves what ``'lean'`` saves (inputs and attention weights) and its
  backward gathers the k/v gradients per source row (no atomics, deterministic). Registered as
  the torch custom op ``acmix_mm::local_attention_cpp`` (with a fake implementation and an
  autograd formula), so it also runs inside ``torch.compile``d graphs.
- ``'triton'``: the Triton GPU kernel of :mod:`acmix_mm.ops.triton_local_attention`.

:func:`resolve_attn_impl` turns ``'auto'`` into one of these per call (see there).

Padding is done by index gathering (:func:`reflect_index`, numpy's ``'reflect'``), so any map
size works, including 1 px (every padded position then reads that pixel).
"""
from __future__ import annotations

import warnings
from typing import List, Tuple

import torch

from . import cpp_extension

__all__ = ['ATTN_IMPLS', 'reflect_index', 'reflect_pad', 'local_attention', 'resolve_attn_impl',
           'unfold_local_attention', 'lean_local_attention', 'cpp_local_attention']

ATTN_IMPLS = ('unfold', 'lean', 'cpp', 'triton')
_CPP_DTYPES = (torch.float32, torch.float64)
_fallback_warned = False


def reflect_index(size: int, pad: int, device: torch.device | None = None) -> torch.Tensor:
    """Source indices (size + 2 * pad,) of a 1-D axis extended by repeated reflection.

    Matches ``numpy.pad(..., mode='reflect')`` for any ``pad`` (also ``pad >= size``) and hence
    torch's reflection padding wherever that is defined (``pad < size``). The reflection has
    period ``2 * (size - 1)``; a 1-px axis maps every index to 0.
    """
    if size < 1:
        raise ValueError(f'reflect_index: size must be >= 1, got {size}')
    if pad < 0:
        raise ValueError(f'reflect_index: pad must be >= 0, got {pad}')
    idx = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the last two dims of ``x`` (..., H, W) by ``pad`` with repeated reflection.

    Returns (..., H + 2 * pad, W + 2 * pad). Differentiable (gather; backward scatters-adds).
    """
    if pad == 0:
        return x
    rows = reflect_index(x.shape[-2], pad, x.device)
    cols = reflect_index(x.shape[-1], pad, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _offset_slices(kernel: int, dilation: int, stride: int, out_hw: Tuple[int, int]
                   ) -> List[Tuple[slice, slice]]:
    """(row slice, col slice) into the padded map for each of the kernel**2 window offsets."""
    h_out, w_out = out_hw
    slices = []
    for t in range(kernel * kernel):
        ty, tx = divmod(t, kernel)
        y0, x0 = ty * dilation, tx * dilation
        slices.append((slice(y0, y0 + (h_out - 1) * stride + 1, stride),
                       slice(x0, x0 + (w_out - 1) * stride + 1, stride)))
    return slices


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[..., rows, :][..., cols]: the padded map, a new tensor (no autograd)."""
    return x.index_select(-2, rows).index_select(-1, cols)


def _scatter_back(grad_pad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  size: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`_gather`: sums the padded map's gradient into its source pixels."""
    partial = grad_pad.new_zeros(*grad_pad.shape[:-1], size[1]).index_add_(-1, cols, grad_pad)
    return grad_pad.new_zeros(*grad_pad.shape[:-2], *size).index_add_(-2, rows, partial)


def _check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int, dilation: int,
                    stride: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f'local attention: kernel must be a positive odd int, got {kernel}')
    if dilation < 1 or stride < 1:
        raise ValueError('local attention: dilation and stride must be >= 1, got '
                         f'{dilation} and {stride}')
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim() or q_pos.dim() != q.dim():
        raise ValueError('local attention: q, k, v, q_pos must be (..., D, H, W) with the same '
                         f'leading dims; got {tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}, {tuple(q_pos.shape)}')
    h, w = k.shape[-2:]
    h_out, w_out = -(-h // stride), -(-w // stride)
    lead = q.shape[:-3]
    if (k.shape[:-3] != lead or v.shape[:-3] != lead or k.shape[-3] != q.shape[-3]
            or v.shape[-2:] != (h, w) or q.shape[-2:] != (h_out, w_out)
            or q_pos.shape != (*lead, 2, h_out, w_out)):
        raise ValueError(
            f'local attention: with keys {tuple(k.shape)} and stride {stride}, expected q '
            f'{(*lead, k.shape[-3], h_out, w_out)}, v {(*lead, "Dv", h, w)}, q_pos '
            f'{(*lead, 2, h_out, w_out)}; got q {tuple(q.shape)}, v {tuple(v.shape)}, '
            f'q_pos {tuple(q_pos.shape)}')
    if coord_x.shape != (w,) or coord_y.shape != (h,):
        raise ValueError(f'local attention: coord_x / coord_y must be ({w},) / ({h},), got '
                         f'{tuple(coord_x.shape)} / {tuple(coord_y.shape)}')
    if coord_x.requires_grad or coord_y.requires_grad:
        raise ValueError('local attention: coordinates are constants; they must not require grad')


def _prepare(k: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int,
             dilation: int, stride: int):
    """Padding indices, padded coordinates and the offsets' slices."""
    h, w = k.shape[-2:]
    pad = dilation * (kernel - 1) // 2
    rows = reflect_index(h, pad, k.device)
    cols = reflect_index(w, pad, k.device)
    slices = _offset_slices(kernel, dilation, stride, (-(-h // stride), -(-w // stride)))
    return rows, cols, coord_x[cols], coord_y[rows], slices


def unfold_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                           kernel: int, dilation: int = 1, stride: int = 1,
                           scale: float = 1.0) -> torch.Tensor:
    """Reference local attention: materialises every window (see module docstring)."""
    _check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    rows, cols, cx, cy, slices = _prepare(k, coord_x, coord_y, kernel, dilation, stride)
    k_pad = k.index_select(-2, rows).index_select(-1, cols)
    v_pad = v.index_select(-2, rows).index_select(-1, cols)
    k_win = torch.stack([k_pad[..., sy, sx] for sy, sx in slices], dim=-3)  # (.., D, K2, Ho, Wo)
    v_win = torch.stack([v_pad[..., sy, sx] for sy, sx in slices], dim=-3)
    h_out, w_out = q.shape[-2:]
    cx_win = torch.stack([cx[sx].view(1, w_out).expand(h_out, w_out) for _, sx in slices])
    cy_win = torch.stack([cy[sy].view(h_out, 1).expand(h_out, w_out) for sy, _ in slices])
    logits = (scale * (q.unsqueeze(-3) * k_win).sum(-4)
              + q_pos[..., 0:1, :, :] * cx_win + q_pos[..., 1:2, :, :] * cy_win)
    attn = logits.softmax(dim=-3)  # (..., K2, Ho, Wo)
    return (attn.unsqueeze(-4) * v_win).sum(-3)


class _LeanLocalAttention(torch.autograd.Function):
    """Offset-loop local attention whose backward recomputes the padded maps and their views.

    Saved for backward: q, k, v exactly as given (in ACMix, views of the q/k/v projection,
    which the convolution branch keeps anyway for its weight gradient), q_pos, the
    coordinates and the attention weights (..., K2, H_out, W_out).
    """

    @staticmethod
    def forward(ctx, q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
        rows, cols, cx, cy, slices = _prepare(k, coord_x, coord_y, kernel, dilation, stride)
        pos_x, pos_y = q_pos[..., 0, :, :], q_pos[..., 1, :, :]
        q_scaled = q * scale
        k_pad = _gather(k, rows, cols)
        logits = q.new_empty(*q.shape[:-3], len(slices), *q.shape[-2:])
        product = torch.empty_like(q_scaled)  # reused: a fresh buffer per offset costs page faults
        for t, (sy, sx) in enumerate(slices):
            logit = logits[..., t, :, :]
            torch.sum(torch.mul(q_scaled, k_pad[..., sy, sx], out=product), dim=-3, out=logit)
            logit.addcmul_(pos_x, cx[sx]).addcmul_(pos_y, cy[sy].unsqueeze(-1))
        del k_pad, q_scaled, product
        attn = torch.softmax(logits, dim=-3)
        del logits
        v_pad = _gather(v, rows, cols)
        out = q.new_zeros(*v.shape[:-2], *q.shape[-2:])
        for t, (sy, sx) in enumerate(slices):
            out.addcmul_(attn[..., t:t + 1, :, :], v_pad[..., sy, sx])
        ctx.save_for_backward(q, k, v, q_pos, coord_x, coord_y, attn)
        ctx.geometry = (kernel, dilation, stride, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, coord_x, coord_y, attn = ctx.saved_tensors
        kernel, dilation, stride, scale = ctx.geometry
        need_q, need_k, need_v, need_pos = ctx.needs_input_grad[:4]
        rows, cols, cx, cy, slices = _prepare(k, coord_x, coord_y, kernel, dilation, stride)
        h_out, w_out = q.shape[-2:]

        # Through the weighted sum: d/d attn_t = grad . v_t, and d/d v_t = attn_t * grad.
        v_pad = _gather(v, rows, cols)
        grad_v_pad = torch.zeros_like(v_pad) if need_v else None
        grad_logits = torch.empty_like(attn)
        product = torch.empty_like(grad_out)
        # sum_t attn_t g_t for the softmax backward, accumulated here to avoid a K2-sized temp.
        mean = attn.new_zeros(*attn.shape[:-3], 1, h_out, w_out)
        for t, (sy, sx) in enumerate(slices):
            grad_t = grad_logits[..., t:t + 1, :, :]
            torch.sum(torch.mul(grad_out, v_pad[..., sy, sx], out=product), dim=-3,
                      keepdim=True, out=grad_t)
            mean.addcmul_(attn[..., t:t + 1, :, :], grad_t)
            if need_v:
                grad_v_pad[..., sy, sx].addcmul_(attn[..., t:t + 1, :, :], grad_out)
        del v_pad, product
        grad_v = _scatter_back(grad_v_pad, rows, cols, v.shape[-2:]) if need_v else None
        del grad_v_pad
        # Softmax backward, in place: attn * (g - sum_t attn_t g_t).
        grad_logits.sub_(mean).mul_(attn)
        del mean

        grad_q = grad_k = grad_pos = None
        if need_q or need_k:
            k_pad = _gather(k, rows, cols)
            q_scaled = q * scale
            grad_q = torch.zeros_like(q_scaled) if need_q else None
            grad_k_pad = torch.zeros_like(k_pad) if need_k else None
            for t, (sy, sx) in enumerate(slices):
                g_t = grad_logits[..., t:t + 1, :, :]
                if need_q:
                    grad_q.addcmul_(g_t, k_pad[..., sy, sx])
                if need_k:
                    grad_k_pad[..., sy, sx].addcmul_(g_t, q_scaled)
            del k_pad, q_scaled
            if need_q:
                grad_q.mul_(scale)
            if need_k:
                grad_k = _scatter_back(grad_k_pad, rows, cols, k.shape[-2:])
        if need_pos:  # d logit_t / d q_pos = (coord_x, coord_y) at the key read by offset t
            grad_pos = q_pos.new_zeros(q_pos.shape)
            for t, (sy, sx) in enumerate(slices):
                grad_pos[..., 0, :, :].addcmul_(grad_logits[..., t, :, :], cx[sx])
                grad_pos[..., 1, :, :].addcmul_(grad_logits[..., t, :, :], cy[sy].unsqueeze(-1))
        return grad_q, grad_k, grad_v, grad_pos, None, None, None, None, None, None


def lean_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                         kernel: int, dilation: int = 1, stride: int = 1,
                         scale: float = 1.0) -> torch.Tensor:
    """Memory-lean local attention (see module docstring); same result as the unfold path."""
    _check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    return _LeanLocalAttention.apply(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride,
                                     float(scale))


def _require_extension():
    ext = cpp_extension.load_extension()
    if ext is None:
        raise RuntimeError("local attention impl 'cpp': the C++ extension could not be built "
                           f'({cpp_extension.extension_error()}); use impl="lean" or "auto"')
    return ext


@torch.library.custom_op('acmix_mm::local_attention_cpp', mutates_args=())
def _cpp_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                 coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int, dilation: int,
                 stride: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (..., Dv, Ho, Wo), attention weights (..., kernel**2, Ho, Wo)) from the C++ kernel."""
    out, attn = _require_extension().forward(q, k, v, q_pos, coord_x, coord_y, kernel, dilation,
                                             stride, scale)
    return out, attn


@_cpp_forward.register_fake
def _cpp_forward_fake(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
    lead, hw_out = q.shape[:-3], q.shape[-2:]
    return (q.new_empty(*lead, v.shape[-3], *hw_out),
            q.new_empty(*lead, kernel * kernel, *hw_out))


@torch.library.custom_op('acmix_mm::local_attention_cpp_backward', mutates_args=())
def _cpp_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                  attn: torch.Tensor, kernel: int, dilation: int, stride: int, scale: float,
                  need_q: bool, need_k: bool, need_v: bool, need_pos: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (q, k, v, q_pos) of the C++ kernel; a (0,) tensor where not needed."""
    grads = _require_extension().backward(grad_out, q, k, v, q_pos, coord_x, coord_y, attn,
                                          kernel, dilation, stride, scale, need_q, need_k,
                                          need_v, need_pos)
    return tuple(grads)


@_cpp_backward.register_fake
def _cpp_backward_fake(grad_out, q, k, v, q_pos, coord_x, coord_y, attn, kernel, dilation,
                       stride, scale, need_q, need_k, need_v, need_pos):
    return tuple(t.new_empty(t.shape if need else (0,))
                 for t, need in ((q, need_q), (k, need_k), (v, need_v), (q_pos, need_pos)))


def _cpp_setup_context(ctx, inputs, output) -> None:
    q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale = inputs
    # As the lean path: the inputs (views, no copies) and the attention weights.
    ctx.save_for_backward(q, k, v, q_pos, coord_x, coord_y, output[1])
    ctx.geometry = (kernel, dilation, stride, scale)
    # The weights' gradient is always None: without this autograd would pass a zero-filled
    # (..., kernel**2, Ho, Wo) tensor to the backward every step.
    ctx.set_materialize_grads(False)


def _cpp_autograd(ctx, grad_out, grad_attn):
    # grad_attn is ignored: the weights are an internal output that callers never see.
    need = tuple(bool(n) for n in ctx.needs_input_grad[:4])
    if grad_out is None:  # grads are not materialised: None means zero
        return (None,) * 10
    grads = _cpp_backward(grad_out, *ctx.saved_tensors, *ctx.geometry, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 6


_cpp_forward.register_autograd(_cpp_autograd, setup_context=_cpp_setup_context)


def cpp_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                        kernel: int, dilation: int = 1, stride: int = 1,
                        scale: float = 1.0) -> torch.Tensor:
    """Local attention by the C++ CPU kernel (see module docstring); float32/float64 on CPU.

    Raises RuntimeError naming the reason if the extension cannot be built.
    """
    _check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    tensors = (q, k, v, q_pos, coord_x, coord_y)
    if any(t.device.type != 'cpu' for t in tensors) or q.dtype not in _CPP_DTYPES or any(
            t.dtype != q.dtype for t in tensors):
        raise ValueError("local attention impl 'cpp' needs CPU tensors of one dtype, float32 or "
                         'float64; got ' + ', '.join(f'{t.dtype} on {t.device}' for t in tensors))
    return _cpp_forward(q, k, v, q_pos, coord_x, coord_y, int(kernel), int(dilation),
                        int(stride), float(scale))[0]


def _triton_module():
    """acmix_mm.ops.triton_local_attention, or None where it (or triton) is not installed."""
    try:
        from . import triton_local_attention
    except ImportError:
        return None
    return triton_local_attention


def _tracing_for_export() -> bool:
    """True while a graph is recorded for export, where custom ops/Functions cannot go."""
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
                or torch.jit.is_scripting() or torch.compiler.is_exporting())


def resolve_attn_impl(requested: str, tensor: torch.Tensor) -> str:
    """The kernel that computes a call with operands like ``tensor`` (e.g. the queries).

    An explicit ``requested`` impl (one of :data:`ATTN_IMPLS`) is returned as is. ``'auto'``:

    - under ONNX export, ``torch.jit`` tracing or ``torch.export``: ``'unfold'`` (plain tensor
      ops; custom ops and autograd Functions do not export);
    - on CPU in float32/float64: ``'cpp'`` if the C++ extension builds (once per machine; see
      :mod:`acmix_mm.ops.cpp_extension`). Under ``torch.compile`` only if it is already loaded
      in this process (a build cannot run inside a traced region), else ``'lean'``. If the
      build fails, ``'lean'``, with one warning naming the reason;
    - on CUDA: ``'triton'`` if :mod:`acmix_mm.ops.triton_local_attention` is importable and
      reports ``triton_available()``;
    - otherwise (e.g. half precision on CPU, CUDA without Triton): ``'lean'``.
    """
    global _fallback_warned
    if requested != 'auto':
        if requested not in ATTN_IMPLS:
            raise ValueError(f"local attention impl must be one of {('auto',) + ATTN_IMPLS}, "
                             f'got {requested!r}')
        return requested
    if _tracing_for_export():
        return 'unfold'
    if tensor.device.type == 'cpu' and tensor.dtype in _CPP_DTYPES:
        if torch.compiler.is_compiling():
            return 'cpp' if cpp_extension.is_loaded() else 'lean'
        if cpp_extension.load_extension() is not None:
            return 'cpp'
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn("acmix_mm: the C++ local-attention kernel is unavailable "
                          f"({cpp_extension.extension_error()}); attn_impl='auto' uses the "
                          "slower 'lean' kernel instead", RuntimeWarning, stacklevel=2)
        return 'lean'
    if tensor.device.type == 'cuda':
        triton = _triton_module()
        if triton is not None and triton.triton_available():
            return 'triton'
    return 'lean'


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int,
                    dilation: int = 1, stride: int = 1, scale: float = 1.0,
                    impl: str = 'auto') -> torch.Tensor:
    """Local attention with the ``impl`` kernel (``'auto'`` or one of :data:`ATTN_IMPLS`;
    ``'auto'`` is resolved by :func:`resolve_attn_impl`).

    See the module docstring for the operands' shapes and the computed function.
    """
    impl = resolve_attn_impl(impl, q)
    args = (q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale)
    if impl == 'lean':
        return lean_local_attention(*args)
    if impl == 'cpp':
        return cpp_local_attention(*args)
    if impl == 'unfold':
        return unfold_local_attention(*args)
    triton = _triton_module()
    if triton is None:
        raise RuntimeError("local attention impl 'triton' needs acmix_mm.ops."
                           'triton_local_attention and the triton package; not importable here')
    return triton.triton_local_attention(*args)
