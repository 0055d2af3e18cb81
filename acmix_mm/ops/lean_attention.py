"""The 'lean' local-attention kernel: an offset loop in PyTorch ops, any device and dtype.

Computes the function of :mod:`acmix_mm.ops.window` (operands and formula there), the same as
the 'unfold' reference of :mod:`acmix_mm.ops.local_attention`. It loops over the kernel**2
window offsets, reading shifted *views* of the padded maps, inside a custom
:class:`torch.autograd.Function` whose backward recomputes the padding. It saves only its
inputs (no copies) and the attention weights (..., kernel**2, H_out, W_out), i.e.
kernel**2 / D of the queries' bytes, and never materialises a (..., D, kernel**2, H_out, W_out)
tensor, in forward or in backward.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .window import check_operands, padded_window

__all__ = ['lean_local_attention']


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[..., rows, :][..., cols]: the padded map, a new tensor (no autograd)."""
    return x.index_select(-2, rows).index_select(-1, cols)


def _scatter_back(grad_pad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  size: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`_gather`: sums the padded map's gradient into its source pixels."""
    partial = grad_pad.new_zeros(*grad_pad.shape[:-1], size[1]).index_add_(-1, cols, grad_pad)
    return grad_pad.new_zeros(*grad_pad.shape[:-2], *size).index_add_(-2, rows, partial)


class _LeanLocalAttention(torch.autograd.Function):
    """Offset-loop local attention whose backward recomputes the padded maps and their views.

    Saved for backward: q, k, v exactly as given (in ACMix, views of the q/k/v projection,
    which the convolution branch keeps anyway for its weight gradient), q_pos, the
    coordinates and the attention weights (..., K2, H_out, W_out).
    """

    @staticmethod
    def forward(ctx, q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride, scale):
        rows, cols, cx, cy, slices = padded_window(k, coord_x, coord_y, kernel, dilation, stride)
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
        rows, cols, cx, cy, slices = padded_window(k, coord_x, coord_y, kernel, dilation, stride)
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
    """Memory-lean local attention (see the module docstring); same result as 'unfold'.

    Returns (..., Dv, H_out, W_out). Differentiable in q, k, v and q_pos.
    """
    check_operands(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride)
    return _LeanLocalAttention.apply(q, k, v, q_pos, coord_x, coord_y, kernel, dilation, stride,
                                     float(scale))
