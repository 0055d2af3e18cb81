"""ACMix's convolution ("shift") branch: the C++ CPU kernel and the choice between kernels.

In ACMix (Pan et al., CVPR 2022) the convolution branch applies ``fc`` (1x1, 3*head -> k*k) and
then ``dep_conv`` (a grouped k x k conv initialised as shifts) to the q/k/v maps. Both are
linear, so :class:`acmix_mm.ops.ACMix` applies them as one grouped conv with their product
kernel: x (B, G*Ci, H, W) with G = head_dim groups of Ci = 3*head channels, weight
(G*Co, Ci, k, k) with Co = head, zero padding ``dilation * (k // 2)``, output
(B, G*Co, ceil(H / s), ceil(W / s)). Two kernels compute it:

- ``'conv'``: ``torch.nn.functional.conv2d`` (oneDNN on CPU, cuDNN on CUDA), with a
  channels-last weight on CPU; any device and dtype, and it exports;
- ``'cpp'``: ``csrc/shift_conv.cpp``, float32/float64 on CPU, a torch custom op
  (``acmix_mm::shift_conv_cpp``) with its own backward. At 12 -> 4 channels a group, oneDNN's
  grouped conv is slow; this kernel runs the k*k taps as vectorised row updates instead.

:func:`resolve_conv_impl` picks one for ``'auto'``; both compute the same function to float
rounding. The C++ kernel is built with the attention kernel (:mod:`acmix_mm.ops.cpp_extension`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from . import cpp_extension
from .local_attention import tracing_for_export

__all__ = ['CONV_IMPLS', 'cpp_shift_conv', 'resolve_conv_impl', 'shift_conv']

CONV_IMPLS = ('conv', 'cpp')
_CPP_DTYPES = (torch.float32, torch.float64)


def _require_extension():
    return cpp_extension.require_extension("ACMix conv_impl 'cpp'", 'conv_impl="conv" or "auto"')


@torch.library.custom_op('acmix_mm::shift_conv_cpp', mutates_args=())
def _cpp_forward(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int,
                 dilation: int) -> torch.Tensor:
    return _require_extension().shift_conv_forward(x, weight, groups, stride, dilation)


@_cpp_forward.register_fake
def _cpp_forward_fake(x, weight, groups, stride, dilation):
    b, _, h, w = x.shape
    return x.new_empty(b, weight.shape[0], (h + stride - 1) // stride, (w + stride - 1) // stride)


@torch.library.custom_op('acmix_mm::shift_conv_cpp_backward', mutates_args=())
def _cpp_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, groups: int,
                  stride: int, dilation: int, need_x: bool, need_w: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_w = _require_extension().shift_conv_backward(grad_out, x, weight, groups, stride,
                                                              dilation, need_x, need_w)
    return grad_x, grad_w


@_cpp_backward.register_fake
def _cpp_backward_fake(grad_out, x, weight, groups, stride, dilation, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)))


def _cpp_setup_context(ctx, inputs, output) -> None:
    x, weight, groups, stride, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (groups, stride, dilation)


def _cpp_autograd(ctx, grad_out):
    need_x, need_w = (bool(n) for n in ctx.needs_input_grad[:2])
    grad_x, grad_w = _cpp_backward(grad_out, *ctx.saved_tensors, *ctx.geometry, need_x, need_w)
    return (grad_x if need_x else None, grad_w if need_w else None, None, None, None)


_cpp_forward.register_autograd(_cpp_autograd, setup_context=_cpp_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int,
           dilation: int) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f'shift conv: x must be (B, C, H, W) and weight (C_out, C_in / groups, '
                         f'k, k), got {tuple(x.shape)} and {tuple(weight.shape)}')
    k = weight.shape[-1]
    if weight.shape[-2] != k or k % 2 != 1:
        raise ValueError(f'shift conv: the kernel must be square and odd, got {tuple(weight.shape)}')
    if groups < 1 or x.shape[1] != groups * weight.shape[1] or weight.shape[0] % groups:
        raise ValueError(f'shift conv: groups={groups} do not fit x {tuple(x.shape)} and weight '
                         f'{tuple(weight.shape)}')
    if stride < 1 or dilation < 1:
        raise ValueError(f'shift conv: stride and dilation must be >= 1, got {stride} and '
                         f'{dilation}')


def cpp_shift_conv(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int = 1,
                   dilation: int = 1) -> torch.Tensor:
    """The branch by the C++ kernel: float32/float64 CPU tensors of one dtype.

    Returns (B, C_out, ceil(H / stride), ceil(W / stride)); differentiable in x and weight.
    Raises ``ValueError`` for other devices, dtypes or shapes, and ``RuntimeError`` naming the
    reason if the extension cannot be built.
    """
    _check(x, weight, groups, stride, dilation)
    if (x.device.type != 'cpu' or weight.device.type != 'cpu' or x.dtype not in _CPP_DTYPES
            or weight.dtype != x.dtype):
        raise ValueError("shift conv impl 'cpp' needs CPU tensors of one dtype, float32 or "
                         f'float64; got x {x.dtype} on {x.device}, weight {weight.dtype} on '
                         f'{weight.device}')
    return _cpp_forward(x, weight, int(groups), int(stride), int(dilation))


def conv_shift_conv(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int = 1,
                    dilation: int = 1) -> torch.Tensor:
    """The branch by ``F.conv2d``; any device and dtype (weight cast to x's dtype).

    No checks of its own: F.conv2d reports bad shapes, and a traced graph (export) must not
    hold Python-side shape tests.
    """
    if x.device.type == 'cpu':
        # A channels-last weight makes oneDNN run this grouped conv (12 inputs, head outputs per
        # group) in NHWC, copying its input: faster forward+backward than its NCHW kernel.
        weight = weight.contiguous(memory_format=torch.channels_last)
    pad = dilation * (weight.shape[-1] // 2)
    return F.conv2d(x, weight.to(x.dtype), None, stride, pad, dilation, groups)


def resolve_conv_impl(requested: str, tensor: torch.Tensor) -> str:
    """The kernel that computes a branch whose input is like ``tensor``.

    An explicit ``requested`` impl (one of :data:`CONV_IMPLS`) is returned as is. ``'auto'``:
    ``'cpp'`` on CPU in float32/float64 when the C++ extension builds (under ``torch.compile``
    only if it is already loaded), except while a graph is recorded for export (ONNX,
    ``torch.jit``, ``torch.export``); ``'conv'`` otherwise. A failed build is reported once by
    the attention's ``'auto'`` (the same extension), so this choice falls back silently.
    """
    if requested != 'auto':
        if requested not in CONV_IMPLS:
            raise ValueError(f"shift conv impl must be one of {('auto',) + CONV_IMPLS}, got "
                             f'{requested!r}')
        return requested
    if tracing_for_export() or tensor.device.type != 'cpu' or tensor.dtype not in _CPP_DTYPES:
        return 'conv'
    if torch.compiler.is_compiling():
        return 'cpp' if cpp_extension.is_loaded() else 'conv'
    return 'cpp' if cpp_extension.load_extension() is not None else 'conv'


def shift_conv(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int = 1,
               dilation: int = 1, impl: str = 'auto') -> torch.Tensor:
    """ACMix's convolution branch with the ``impl`` kernel (``'auto'``, ``'conv'`` or ``'cpp'``).

    x (B, groups * C_in, H, W), weight (C_out, C_in, k, k), k odd; zero padding
    ``dilation * (k // 2)``. Returns (B, C_out, ceil(H / stride), ceil(W / stride)).
    """
    if resolve_conv_impl(impl, x) == 'cpp':
        return cpp_shift_conv(x, weight.to(x.dtype), groups, stride, dilation)
    return conv_shift_conv(x, weight, groups, stride, dilation)
