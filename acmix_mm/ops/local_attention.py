"""Sliding-window (local) dot-product attention for ACMix: the dispatcher and the reference.

ACMix's attention branch (Pan et al., "On the Integration of Self-Attention and Convolution",
CVPR 2022, arXiv:2111.14556) lets every query attend to the ``kernel x kernel`` window of
keys around it, with a relative-position term. The operands' shapes, the window geometry and
the computed function are defined in :mod:`acmix_mm.ops.window`; four kernels compute it:

- ``'unfold'`` (:func:`unfold_local_attention`, here): the straightforward reference. It
  stacks the kernel**2 shifted copies of the padded ``k`` and ``v`` (a
  (..., D, kernel**2, H_out, W_out) tensor each), which autograd keeps: ~2 * kernel**2 times
  the bytes of ``k`` are saved for backward. Plain tensor ops, so it exports (ONNX,
  ``torch.jit.trace``, ``torch.export``).
- ``'lean'`` (:mod:`acmix_mm.ops.lean_attention`): an offset loop over views of the padded
  maps that saves only its inputs and the attention weights; any device and dtype.
- ``'cpp'`` (:mod:`acmix_mm.ops.cpp_attention`): the C++ CPU kernel, float32/float64, a torch
  custom op (it runs inside ``torch.compile``d graphs).
- ``'triton'`` (:mod:`acmix_mm.ops.triton_local_attention`): the Triton CUDA kernel.

:func:`local_attention` runs the kernel that :func:`resolve_attn_impl` picks (``'auto'``) or
the one asked for. Every kernel computes the same function as ``'unfold'``, to float rounding.
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

from . import cpp_extension
from .cpp_attention import CPP_DTYPES, cpp_local_attention
from .lean_attention import lean_local_attention
from .window import check_operands, padded_window

__all__ = ['ATTN_IMPLS', 'local_attention', 'resolve_attn_impl', 'tracing_for_export',
           'unfold_local_attention']

ATTN_IMPLS = ('unfold', 'lean', 'cpp', 'triton')
_fallback_warned = False


def unfold_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_pos: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor,
                           kernel: int, dilation: int = 1, stride: int = 1,
                           scale: float = 1.0) -> torch.Tensor:
    """Reference local attention: materialises every window (see the module docstring).

    Returns (..., Dv, H_out, W_out). Differentiable in q, k, v and q_pos (plain autograd).
    """
    check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    rows, cols, cx, cy, slices = padded_window(k, coord_x, coord_y, kernel, dilation, stride)
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


def _triton_module() -> ModuleType:
    """acmix_mm.ops.triton_local_attention, imported on first need.

    Lazily, because importing it imports triton (where installed) and defines its kernels:
    work that CPU-only use of ACMix should not pay at ``import acmix_mm``. The module imports
    without triton too; it then reports ``triton_available() == False``.
    """
    from . import triton_local_attention
    return triton_local_attention


def tracing_for_export() -> bool:
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
    - on CUDA: ``'triton'`` if :mod:`acmix_mm.ops.triton_local_attention` reports
      ``triton_available()`` (triton installed);
    - otherwise (e.g. half precision on CPU, CUDA without Triton): ``'lean'``.
    """
    global _fallback_warned
    if requested != 'auto':
        if requested not in ATTN_IMPLS:
            raise ValueError(f"local attention impl must be one of {('auto',) + ATTN_IMPLS}, "
                             f'got {requested!r}')
        return requested
    if tracing_for_export():
        return 'unfold'
    if tensor.device.type == 'cpu' and tensor.dtype in CPP_DTYPES:
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
    if tensor.device.type == 'cuda' and _triton_module().triton_available():
        return 'triton'
    return 'lean'


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int,
                    dilation: int = 1, stride: int = 1, scale: float = 1.0,
                    impl: str = 'auto') -> torch.Tensor:
    """Local attention with the ``impl`` kernel (``'auto'`` or one of :data:`ATTN_IMPLS`;
    ``'auto'`` is resolved by :func:`resolve_attn_impl`).

    See :mod:`acmix_mm.ops.window` for the operands' shapes and the computed function.
    Returns (..., Dv, H_out, W_out).
    """
    impl = resolve_attn_impl(impl, q)
    args = (q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale)
    if impl == 'lean':
        return lean_local_attention(*args)
    if impl == 'cpp':
        return cpp_local_attention(*args)
    if impl == 'unfold':
        return unfold_local_attention(*args)
    return _triton_module().triton_local_attention(*args)
