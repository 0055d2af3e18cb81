"""The 'cpp' local-attention kernel: the C++ CPU kernel, registered as a torch custom op.

Computes the function of :mod:`acmix_mm.ops.window` (operands and formula there) with
``csrc/local_attention.cpp``, built on first use by :mod:`acmix_mm.ops.cpp_extension`:
float32/float64 CPU tensors, multithreaded with torch's thread pool. Per output row it gathers
the key/value rows of the window once and runs the dot products vectorised over x; it saves
what 'lean' saves (inputs and attention weights) and its backward gathers the k/v gradients
per source row (no atomics, deterministic).

Registered as the torch custom op ``acmix_mm::local_attention_cpp`` (with a fake
implementation and an autograd formula), so it also runs inside ``torch.compile``d graphs.
Importing this module registers the ops; it does not build the extension (the first call
does).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import cpp_extension
from .window import check_operands

__all__ = ['CPP_DTYPES', 'cpp_local_attention']

# The dtypes the C++ kernel is compiled for.
CPP_DTYPES = (torch.float32, torch.float64)


def _require_extension():
    return cpp_extension.require_extension("local attention impl 'cpp'", 'impl="lean" or "auto"')


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
    """Local attention by the C++ CPU kernel (see the module docstring); float32/float64 on CPU.

    Returns (..., Dv, H_out, W_out). Differentiable in q, k, v and q_pos. Raises
    ``ValueError`` for other devices or dtypes and ``RuntimeError`` naming the reason if the
    extension cannot be built.
    """
    check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    tensors = (q, k, v, q_pos, coord_x, coord_y)
    if any(t.device.type != 'cpu' for t in tensors) or q.dtype not in CPP_DTYPES or any(
            t.dtype != q.dtype for t in tensors):
        raise ValueError("local attention impl 'cpp' needs CPU tensors of one dtype, float32 or "
                         'float64; got ' + ', '.join(f'{t.dtype} on {t.device}' for t in tensors))
    return _cpp_forward(q, k, v, q_pos, coord_x, coord_y, int(kernel), int(dilation),
                        int(stride), float(scale))[0]
