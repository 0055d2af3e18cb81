"""Both ACMix branches in one CPU op: one pass over the projection, one gradient buffer.

:class:`acmix_mm.ops.ACMix` takes this path when its attention and convolution kernels both
resolve to ``'cpp'`` (CPU, float32/float64). Given the layer's 1x1 projection

    proj (B, 3*C + 2*head, H, W): channels [0, 3C) are q, k, v in ACMix's (head_dim, [q, k, v]
    heads) order, channels 3C + 2*h + c hold head h's position weights q_pos (c = x, y), which
    ACMix folds into the projection (they are linear in q, so linear in the input),

the op returns ``conv(proj[:, :3C]) + rate1 * attention(q, k, v, q_pos)`` (B, C, H_out, W_out)
with the C++ kernels of :mod:`acmix_mm.ops.cpp_shift` and :mod:`acmix_mm.ops.cpp_attention`:
the attention adds ``rate1 *`` its output into the convolution's output map, and the backward
writes the convolution's input gradient into one (B, 3C + 2*head, H, W) buffer, into whose q, k,
v (and q_pos) views the attention's gradients are added, so no per-branch gradient maps are
allocated, summed or copied. Between forward and backward the op keeps only the projection and
the small kernels: no attention output for ``rate1``'s gradient (the kernel's softmax backward
already holds ``grad_out . out`` per query), and no attention weights, which the backward
recomputes bit for bit and then uses as its work buffer.

The same function as the two separate ops to float rounding; registered as the torch custom op
``acmix_mm::acmix_branches_cpp`` (fake implementation and autograd formula included).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..utils.allocator import freed_memory_retained
from . import cpp_extension

__all__ = ['cpp_acmix_branches', 'project', 'split_projection']


# Projections of at least this many output bytes run as the batched product when freed memory
# is not retained (below it oneDNN's temporaries fit under glibc's mmap threshold, which adapts
# up to 32 MiB, and the convolution is faster).
_GEMM_BYTES = 16 * 2**20


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The 1x1 projection (B, C_in, H, W) -> (B, P, H, W) with weight (P, C_in), bias (P,).

    Two ways to run it on CPU (measured in ``docs/benchmarks.md#allocation``): oneDNN's
    convolution, the faster kernel, allocates large temporaries, which glibc by default maps and
    faults in anew at every call once they pass its mmap threshold; a batched BLAS product
    allocates only its output. So: the convolution where freed memory is kept in the process
    (:func:`acmix_mm.utils.allocator.freed_memory_retained`) or the output is under 16 MiB, the
    batched product otherwise. Both are the same function to float rounding.
    """
    b, c, h, w = x.shape
    if freed_memory_retained() or b * weight.shape[0] * h * w * x.element_size() < _GEMM_BYTES:
        return F.conv2d(x, weight.view(*weight.shape, 1, 1), bias)
    return torch.baddbmm(bias.view(1, -1, 1), weight.expand(b, -1, -1),
                         x.reshape(b, c, h * w)).view(b, -1, h, w)


def _require_extension():
    return cpp_extension.require_extension("ACMix's fused C++ branches",
                                           'attn_impl="lean" or conv_impl="conv"')


def split_projection(proj: torch.Tensor, head: int, stride: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (q, k, v, q_pos) of a fused projection (see the module docstring).

    q (B, head, head_dim, H_out, W_out) and q_pos (B, head, 2, H_out, W_out) at the query
    positions ``[::stride, ::stride]``, k and v (B, head, head_dim, H, W).
    """
    b, p, h, w = proj.shape
    dim = (p - 2 * head) // (3 * head)
    qkv = proj[:, :3 * head * dim].view(b, dim, 3, head, h, w).permute(2, 0, 3, 1, 4, 5)
    q, k, v = qkv.unbind(0)
    q_pos = proj[:, 3 * head * dim:].view(b, head, 2, h, w)
    return q[..., ::stride, ::stride], k, v, q_pos[..., ::stride, ::stride]


@torch.library.custom_op('acmix_mm::acmix_branches_cpp', mutates_args=())
def _fused_forward(proj: torch.Tensor, weight: torch.Tensor, rate1: torch.Tensor,
                   coord_x: torch.Tensor, coord_y: torch.Tensor, head: int, kernel_att: int,
                   dilation: int, stride: int, scale: float) -> torch.Tensor:
    """out (B, C, H_out, W_out)."""
    ext = _require_extension()
    channels = proj.shape[1] - 2 * head
    dim = channels // (3 * head)
    out = ext.shift_conv_forward(proj[:, :channels], weight, dim, stride, dilation)
    q, k, v, q_pos = split_projection(proj, head, stride)
    b, _, h_out, w_out = out.shape
    # The attention weights are not kept: the backward recomputes them (the same arithmetic,
    # so the same bits), which saves a (B, head, kernel_att**2, H_out, W_out) map per layer
    # between forward and backward for a fraction of the forward's time.
    ext.forward_add(q, k, v, q_pos, coord_x, coord_y, kernel_att, dilation, stride, scale,
                    out.view(b, head, dim, h_out, w_out), float(rate1))
    return out


@_fused_forward.register_fake
def _fused_forward_fake(proj, weight, rate1, coord_x, coord_y, head, kernel_att, dilation, stride,
                        scale):
    b, _, h, w = proj.shape
    h_out, w_out = (h + stride - 1) // stride, (w + stride - 1) // stride
    return proj.new_empty(b, weight.shape[0], h_out, w_out)


@torch.library.custom_op('acmix_mm::acmix_branches_cpp_backward', mutates_args=())
def _fused_backward(grad_out: torch.Tensor, proj: torch.Tensor, weight: torch.Tensor,
                    rate1: torch.Tensor, coord_x: torch.Tensor,
                    coord_y: torch.Tensor, head: int, kernel_att: int, dilation: int,
                    stride: int, scale: float, need_weight: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_proj, grad_weight ((0,) if not needed), grad_rate1 (1,))."""
    ext = _require_extension()
    grad_out = grad_out.to(proj.dtype).contiguous()
    channels = proj.shape[1] - 2 * head
    dim = channels // (3 * head)
    grad_proj = torch.empty_like(proj, memory_format=torch.contiguous_format)
    # The convolution's input gradient covers every q/k/v element (written); the attention's
    # is then added into the q, k, v views. q_pos has only the attention's gradient, at the
    # query positions: zero elsewhere.
    if stride > 1:
        grad_proj[:, channels:].zero_()
    grad_weight = ext.shift_conv_backward_into(grad_out, proj[:, :channels], weight, dim, stride,
                                               dilation, grad_proj[:, :channels], need_weight)
    q, k, v, q_pos = split_projection(proj, head, stride)
    # Recomputed (see the forward), and then this op's own work buffer: the kernel overwrites it
    # with the logits' gradient instead of allocating one more map of its size.
    attn = ext.attention_weights(q, k, v, q_pos, coord_x, coord_y, kernel_att, dilation, stride,
                                 scale)
    b, _, h_out, w_out = grad_out.shape
    grad_rate1 = ext.backward_add(grad_out.view(b, head, dim, h_out, w_out), q, k, v, q_pos,
                                  coord_x, coord_y, attn, kernel_att, dilation, stride, scale,
                                  float(rate1), *split_projection(grad_proj, head, stride), True)
    return grad_proj, grad_weight, rate1.new_full((1,), grad_rate1)


@_fused_backward.register_fake
def _fused_backward_fake(grad_out, proj, weight, rate1, coord_x, coord_y, head, kernel_att,
                         dilation, stride, scale, need_weight):
    return (torch.empty_like(proj, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape if need_weight else (0,)), rate1.new_empty(1))


def _fused_setup_context(ctx, inputs, output) -> None:
    proj, weight, rate1, coord_x, coord_y, head, kernel_att, dilation, stride, scale = inputs
    ctx.save_for_backward(proj, weight, rate1, coord_x, coord_y)
    ctx.geometry = (head, kernel_att, dilation, stride, scale)


def _fused_autograd(ctx, grad_out):
    need_proj, need_weight, need_rate = ctx.needs_input_grad[:3]
    grad_proj, grad_weight, grad_rate1 = _fused_backward(grad_out, *ctx.saved_tensors,
                                                         *ctx.geometry, bool(need_weight))
    return ((grad_proj if need_proj else None), (grad_weight if need_weight else None),
            (grad_rate1 if need_rate else None)) + (None,) * 7


_fused_forward.register_autograd(_fused_autograd, setup_context=_fused_setup_context)


def cpp_acmix_branches(proj: torch.Tensor, weight: torch.Tensor, rate1: torch.Tensor,
                       coord_x: torch.Tensor, coord_y: torch.Tensor, head: int, kernel_att: int,
                       dilation: int, stride: int, scale: float) -> torch.Tensor:
    """``conv(proj[:, :3C]) + rate1 * attention`` by the C++ kernels (module docstring).

    proj (B, 3*C + 2*head, H, W) contiguous, float32/float64 on CPU; weight (C, 3*head, k, k) the
    convolution branch's product kernel (``rate2`` included); rate1 (1,); coord_x (W,) and
    coord_y (H,). Returns (B, C, ceil(H / stride), ceil(W / stride)); differentiable in proj,
    weight and rate1.
    """
    return _fused_forward(proj.contiguous(), weight.to(proj.dtype).contiguous(),
                          rate1.to(proj.dtype), coord_x, coord_y, int(head), int(kernel_att),
                          int(dilation), int(stride), float(scale))
