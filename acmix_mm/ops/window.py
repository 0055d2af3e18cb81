"""The sliding window every local-attention kernel reads, and the operands' contract.

Shared by all kernels (the reference and 'lean', the C++ and the Triton kernel); it imports
no kernel, so each kernel module imports only this one.

Operands (``...`` = any leading dims, in ACMix (batch, head)):

- ``q``: (..., D, H_out, W_out) queries at the output positions, ``H_out = ceil(H / stride)``,
  ``W_out = ceil(W / stride)`` (:func:`output_size`);
- ``k``: (..., D, H, W) keys and ``v``: (..., Dv, H, W) values, *unpadded*;
- ``q_pos``: (..., 2, H_out, W_out) each query's weights on the key coordinates;
- ``coord_x``: (W,) and ``coord_y``: (H,) the key coordinates (constants: no gradient).

:func:`check_operands` enforces these shapes and the geometry (odd ``kernel``, ``dilation``
and ``stride`` >= 1). The maps are extended by repeated reflection (:func:`reflect_index`,
numpy's ``'reflect'``) by ``pad = dilation * (kernel - 1) // 2`` (:func:`window_pad`), so any
map size works, 1 px included (every padded position then reads that pixel). The window of
output position (y, x) is centred on input position (y * stride, x * stride); its offset
t = (ty, tx), ``t = ty * kernel + tx``, reads padded position
p_t = (y * stride + ty * dilation, x * stride + tx * dilation), and every kernel computes

    logit_t = scale * q . k[p_t] + q_pos[0] * coord_x[p_t] + q_pos[1] * coord_y[p_t]
    out     = sum_t softmax_t(logit) * v[p_t]                  (..., Dv, H_out, W_out)
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

__all__ = ['reflect_index', 'reflect_pad', 'window_pad', 'output_size', 'offset_slices',
           'PaddedWindow', 'padded_window', 'check_operands']


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

    Returns (..., H + 2 * pad, W + 2 * pad). Differentiable (gather; backward scatter-adds).
    """
    if pad == 0:
        return x
    rows = reflect_index(x.shape[-2], pad, x.device)
    cols = reflect_index(x.shape[-1], pad, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def window_pad(kernel: int, dilation: int) -> int:
    """Padding on each side that centres a ``kernel``-wide window of spacing ``dilation``."""
    return dilation * (kernel - 1) // 2


def output_size(h: int, w: int, stride: int) -> Tuple[int, int]:
    """(H_out, W_out) = (ceil(H / stride), ceil(W / stride)): one query per stride step."""
    return -(-h // stride), -(-w // stride)


def offset_slices(kernel: int, dilation: int, stride: int, out_hw: Tuple[int, int]
                  ) -> List[Tuple[slice, slice]]:
    """(row slice, col slice) into the padded map for each of the kernel**2 window offsets.

    ``padded[..., rows, cols]`` is the (..., H_out, W_out) map of the keys that offset t reads.
    """
    h_out, w_out = out_hw
    slices = []
    for t in range(kernel * kernel):
        ty, tx = divmod(t, kernel)
        y0, x0 = ty * dilation, tx * dilation
        slices.append((slice(y0, y0 + (h_out - 1) * stride + 1, stride),
                       slice(x0, x0 + (w_out - 1) * stride + 1, stride)))
    return slices


class PaddedWindow(NamedTuple):
    """What the PyTorch kernels need to read the window from the padded maps."""

    rows: torch.Tensor  # (H + 2 * pad,) source row of each padded row
    cols: torch.Tensor  # (W + 2 * pad,) source column of each padded column
    coord_x: torch.Tensor  # (W + 2 * pad,) coord_x of each padded column
    coord_y: torch.Tensor  # (H + 2 * pad,) coord_y of each padded row
    slices: List[Tuple[slice, slice]]  # per offset t, see offset_slices


def padded_window(k: torch.Tensor, coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int,
                  dilation: int, stride: int) -> PaddedWindow:
    """The padding indices, padded coordinates and offsets' slices for keys ``k`` (..., H, W)."""
    h, w = k.shape[-2:]
    pad = window_pad(kernel, dilation)
    rows = reflect_index(h, pad, k.device)
    cols = reflect_index(w, pad, k.device)
    slices = offset_slices(kernel, dilation, stride, output_size(h, w, stride))
    return PaddedWindow(rows, cols, coord_x[cols], coord_y[rows], slices)


def check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   coord_x: torch.Tensor, coord_y: torch.Tensor, kernel: int, dilation: int,
                   stride: int) -> None:
    """Raise ``ValueError`` naming the problem unless the operands fit the module's contract.

    Checks the geometry and the shapes only; dtypes and devices are each kernel's business.
    """
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
    h_out, w_out = output_size(h, w, stride)
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
