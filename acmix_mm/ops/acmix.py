"""The ACMix operator: a drop-in replacement for a 3x3 convolution.

ACMix (Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022,
arXiv:2111.14556) shares one set of 1x1 projections q, k, v between two branches:

- attention: per head, every query attends to a ``kernel_att x kernel_att`` window of keys, with
  a learned relative position term built from a 2-channel coordinate map;
- convolution ("shift"): a 1x1 ``fc`` mixes the 3*head q/k/v heads into ``kernel_conv**2``
  feature maps per head channel, and a grouped ``dep_conv`` (initialised as shifts) sums them
  over a ``kernel_conv x kernel_conv`` neighbourhood;

and returns ``rate1 * attention + rate2 * convolution``. This implementation keeps the
authors' parameter names and shapes (their checkpoints load with ``strict=True``) and their
outputs where their code runs, and also works where theirs fails: odd sizes at stride > 1,
maps of 1-3 px, half precision / float64, ``kernel_conv != 3`` and ``dilation > 1``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cpp_fused import cpp_acmix_branches, project
from .cpp_shift import CONV_IMPLS, resolve_conv_impl, shift_conv
from .local_attention import ATTN_IMPLS, local_attention, resolve_attn_impl
from .replaced_conv import take_replaced_conv

__all__ = ['ACMix', 'ShiftConv2d']

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'ACMix: {name} must be an int, got {type(value).__name__} {value!r}')
    if value < 1:
        raise ValueError(f'ACMix: {name} must be a positive int, got {value}')
    return value


class ShiftConv2d(nn.Module):
    """ACMix's ``dep_conv``: the weight and geometry of a grouped, bias-free conv.

    Holds ``weight`` (C_out, C_in / groups, k, k) and nn.Conv2d's geometry attributes (pairs).
    :class:`ACMix` reads them to build its fused conv-branch kernel, so this module's own
    ``forward`` only serves direct use.

    It is deliberately *not* an ``nn.Conv2d``: mmengine's initialisers select layers by class
    name (``dict(type='Kaiming', layer='Conv2d')`` in mmdet's ResNet, ``Xavier`` in FPN,
    ``Normal`` in RetinaHead), and would otherwise overwrite the shift initialisation of every
    ACMix inside the module they initialise, the bug of the authors' ResNet. Initialisers that
    name it (``override=dict(name='dep_conv')``) still reach it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 dilation: int, groups: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.dilation = (dilation, dilation)
        self.padding = (dilation * (kernel_size // 2),) * 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size,
                                               kernel_size))
        self.register_parameter('bias', None)  # as a bias-free nn.Conv2d: no state_dict entry
        # nn.Conv2d's own default init, drawn from the generator like one: ACMix replaces it with
        # the shift at once, but seeded models then draw the numbers they drew when dep_conv
        # was an nn.Conv2d.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'groups={self.groups}, bias=False')


class ACMix(nn.Module):
    """ACMix layer (ResNet variant): maps (B, in_channels, H, W) to
    (B, out_channels, ceil(H / stride), ceil(W / stride)), like
    ``nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation)``.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out; must be divisible by ``head``.
        kernel_att: side of the attention window (odd, default 7).
        head: number of attention heads; ``head_dim = out_channels // head``.
        kernel_conv: side of the convolution branch's kernel (odd, default 3).
        stride: output stride s (queries are taken at ``[::s, ::s]``).
        dilation: spacing d of both the attention window's offsets and ``dep_conv``'s taps.
        attn_impl: the attention kernel (see :mod:`acmix_mm.ops.local_attention`):
            ``'auto'`` (default) picks one per call with
            :func:`~acmix_mm.ops.local_attention.resolve_attn_impl`: ``'cpp'`` on CPU in
            float32/float64 (the C++ kernel, compiled once per machine on first use; ``'lean'``
            with one warning if it cannot be built), ``'triton'`` on CUDA where Triton is
            available, ``'unfold'`` while exporting (ONNX, ``torch.jit.trace``,
            ``torch.export``), ``'lean'`` otherwise (and under ``torch.compile`` unless the C++
            kernel is already loaded). Or force one: ``'cpp'``, ``'lean'`` (memory-lean
            offset loop in PyTorch ops, any device/dtype), ``'unfold'`` (straightforward
            reference; it keeps every window for backward) or ``'triton'``.
        conv_impl: the convolution branch's kernel (see :mod:`acmix_mm.ops.cpp_shift`):
            ``'auto'`` (default) picks ``'cpp'`` (the C++ kernel, built with the attention
            kernel) on CPU in float32/float64 and ``'conv'`` (``F.conv2d``) elsewhere and
            while exporting; or force ``'conv'`` or ``'cpp'``.

    Parameters (the authors' names; shapes for C_in = C_out = 64, head = 4: 17,822 in total):

    - ``rate1`` (1,), ``rate2`` (1,): weights of the attention / convolution branch (0.5 at init);
    - ``conv1`` / ``conv2`` / ``conv3``: 1x1 convs with bias producing q / k / v,
      (C_out, C_in, 1, 1);
      channel c belongs to head ``c // head_dim``;
    - ``conv_p``: 1x1 conv with bias, 2 -> head_dim, turning the (x, y) coordinate map into the
      positional encoding pe (shared by the heads);
    - ``fc``: 1x1 conv without bias, 3*head -> kernel_conv**2, over the stacked [q, k, v] heads;
    - ``dep_conv``: grouped kernel_conv x kernel_conv conv without bias, groups = head_dim,
      kernel_conv**2 * head_dim -> C_out; initialised as a shift (:meth:`reset_parameters`).
      A :class:`ShiftConv2d`, so that initialisers aimed at ``Conv2d`` layers skip it.

    Loading a checkpoint of the network this layer replaced a conv in (a stock ResNet's
    ``layer2.0.conv2.weight``): the conv's entry (``weight`` of shape
    (C_out, C_in, kernel_conv, kernel_conv), and ``bias``) is taken out as unused and every ACMix
    parameter keeps its current value, through ``load_state_dict`` (strict or not) and mmengine's
    ``load_checkpoint`` alike; one log line per loaded module reports it
    (:mod:`acmix_mm.ops.replaced_conv`). A checkpoint with ACMix keys for the layer loads them as
    usual.

    Attention branch, per head: ``logit_ij = q_i . (k_j + pe_i - pe_j)`` with q scaled by
    ``head_dim ** -0.5``, softmax over the window positions j, ``out_i = sum_j a_ij v_j``.
    The coordinate map is ``linspace(-1, 1, W)`` (x) and ``linspace(-1, 1, H)`` (y) over the
    current map, in the input's dtype and device. Since ``pe_i - pe_j = W_p (c_i - c_j)``, the
    term ``q_i . pe_i`` is constant over j and ``conv_p.bias`` cancels, so the kernels compute
    the same softmax as plain local attention with ``q' = [q, -W_p^T q]`` and ``k' = [k, c]``
    (head_dim + 2 dims); ``conv_p.bias`` therefore gets an exactly-zero gradient, as in the
    authors' model.

    Semantics beyond the authors' code (which fails in these cases):

    - Borders: keys, values and coordinates are extended by *repeated* reflection (numpy's
      ``'reflect'``; torch's reflection padding wherever that is defined, i.e. pad < size),
      via index gathering, so maps of any size work; a 1-px map attends kernel_att**2 times to
      its single pixel.
    - Stride: the window of output position (y, x) is centred on input position (y*s, x*s),
      giving ceil(H / s) x ceil(W / s) outputs; ``dep_conv`` uses padding
      ``dilation * (kernel_conv // 2)`` and stride s, which gives the same size.
    - Dilation d: window offsets are spaced by d (padding ``d * (kernel_att - 1) // 2``), and
      ``dep_conv`` is dilated by d.
    - Precision: with float16/bfloat16 activations (autocast or a half-precision model), the
      attention branch (logits, softmax, weighted sum) runs in float32 and is cast back to
      the activations' dtype, so large logits do not overflow in fp16. The coordinate map
      follows the computation's dtype and device.

    Implementation notes (same function as the authors', different arithmetic order, so
    results agree to float rounding, ~1e-6 relative in fp32):

    - conv1/conv2/conv3 run as one 1x1 conv whose output channels are ordered
      (head_dim, [q, k, v] heads), see :meth:`_qkv_projection`;
    - ``fc`` then ``dep_conv`` run as one grouped conv with the product kernel (both are
      linear), so the (B, head_dim * kernel_conv**2, H, W) intermediate is never stored;
    - ``attn_impl='lean'`` and ``'cpp'`` never materialise the (B, C, kernel_att**2, H, W)
      windows: for backward they keep only their operands (q, k, v as views of the
      projection) and the attention weights (B, head, kernel_att**2, H_out, W_out);
    - where both kernels resolve to ``'cpp'`` (CPU, float32/float64, no autocast) the two
      branches run as one C++ op (:mod:`acmix_mm.ops.cpp_fused`): q_pos comes from 2*head
      extra rows of the projection (:meth:`_fused_projection`), one gradient buffer serves
      both branches, and ``rate1``'s gradient is summed inside the kernel (no attention map is
      kept for it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_att: int = 7, head: int = 4,
                 kernel_conv: int = 3, stride: int = 1, dilation: int = 1,
                 attn_impl: str = 'auto', conv_impl: str = 'auto') -> None:
        super().__init__()
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels),
                            ('kernel_att', kernel_att), ('head', head),
                            ('kernel_conv', kernel_conv), ('stride', stride),
                            ('dilation', dilation)):
            _check_positive_int(name, value)
        if out_channels % head != 0:
            raise ValueError(f'ACMix: out_channels ({out_channels}) must be divisible by head '
                             f'({head})')
        for name, value in (('kernel_att', kernel_att), ('kernel_conv', kernel_conv)):
            if value % 2 == 0:
                raise ValueError(f'ACMix: {name} must be odd (the window is centred on the '
                                 f'query), got {value}')
        if attn_impl not in ('auto',) + ATTN_IMPLS:
            raise ValueError(f"ACMix: attn_impl must be one of {('auto',) + ATTN_IMPLS}, "
                             f'got {attn_impl!r}')
        if conv_impl not in ('auto',) + CONV_IMPLS:
            raise ValueError(f"ACMix: conv_impl must be one of {('auto',) + CONV_IMPLS}, "
                             f'got {conv_impl!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_att = kernel_att
        self.head = head
        self.head_dim = out_channels // head
        self.kernel_conv = kernel_conv
        self.stride = stride
        self.dilation = dilation
        self.attn_impl = attn_impl  # 'auto' is resolved per call (device, dtype, tracing)
        self.conv_impl = conv_impl
        self.padding_att = dilation * (kernel_att - 1) // 2

        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1)  # q
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size=1)  # k
        self.conv3 = nn.Conv2d(in_channels, out_channels, kernel_size=1)  # v
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        self.dep_conv = ShiftConv2d(kernel_conv * kernel_conv * self.head_dim, out_channels,
                                    kernel_conv, stride, dilation, groups=self.head_dim)
        self.reset_parameters()

    def shift_kernel(self) -> torch.Tensor:
        """The shift initialisation of ``dep_conv.weight``: (C_out, k*k, k, k), input channel t
        of every group one-hot at (t // k, t % k)."""
        k = self.kernel_conv
        eye = torch.eye(k * k, dtype=self.dep_conv.weight.dtype,
                        device=self.dep_conv.weight.device)
        return eye.view(1, k * k, k, k).expand(self.out_channels, -1, -1, -1).clone()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """rate1 = rate2 = 0.5 and the shift kernel in ``dep_conv``.

        The 1x1 convs keep PyTorch's default init (as the authors'). Backbones whose init loop
        overwrites every conv (e.g. kaiming) can call this afterwards to restore the shift.
        """
        self.rate1.fill_(0.5)
        self.rate2.fill_(0.5)
        self.dep_conv.weight.copy_(self.shift_kernel())

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_att={self.kernel_att}, '
                f'head={self.head}, kernel_conv={self.kernel_conv}, stride={self.stride}, '
                f'dilation={self.dilation}, attn_impl={self.attn_impl!r}, '
                f'conv_impl={self.conv_impl!r}')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        take_replaced_conv(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'ACMix expects (B, {self.in_channels}, H, W), got '
                             f'{tuple(x.shape)}')
        if self._fused_branches(x):
            return self._forward_fused(x)
        qkv = F.conv2d(x, *self._qkv_projection())
        out_att = self._attention(qkv)
        out_conv = self._convolution(qkv)  # already weighted by rate2
        # conv_p.bias cancels in the softmax (zero gradient, as in the authors' model); this
        # exact-zero term keeps it in the graph so that DDP does not flag it as unused. Added
        # to the scalar rate rather than to the map: no extra pass over the output.
        rate1 = self.rate1 + 0.0 * self.conv_p.bias.sum()
        # One pass: out_conv + rate1 * out_att. The rate follows the branches' dtype so that
        # autocast outputs stay in half precision.
        return torch.addcmul(out_conv, rate1.to(out_att.dtype), out_att.to(out_conv.dtype))

    def _qkv_projection(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """conv1/conv2/conv3 as one 1x1 conv: weight (3*C_out, C_in, 1, 1) and bias (3*C_out,).

        Output channels are ordered (head_dim, [q heads, k heads, v heads]), i.e. channel
        ``d * 3*head + j`` is row ``d`` of head-stack entry ``j``, so that the convolution
        branch is one grouped conv (groups = head_dim) reading contiguous channel groups.
        """
        stack = 3 * self.head
        weight = torch.cat([self.conv1.weight, self.conv2.weight, self.conv3.weight])
        bias = torch.cat([self.conv1.bias, self.conv2.bias, self.conv3.bias])
        weight = weight.view(stack, self.head_dim, -1).transpose(0, 1).reshape(
            stack * self.head_dim, self.in_channels, 1, 1)
        bias = bias.view(stack, self.head_dim).t().reshape(-1)
        return weight, bias

    def _fused_branches(self, x: torch.Tensor) -> bool:
        """Whether both branches run as one C++ op (:mod:`acmix_mm.ops.cpp_fused`): when both
        kernels resolve to ``'cpp'`` for x and autocast does not change the projection's dtype."""
        if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(
                x.device.type):
            return False
        return (resolve_attn_impl(self.attn_impl, x) == 'cpp'
                and resolve_conv_impl(self.conv_impl, x) == 'cpp')

    def _fused_projection(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The q/k/v projection of :meth:`_qkv_projection` with 2*head more output rows, the
        position weights: weight (3*C_out + 2*head, C_in), bias (3*C_out + 2*head,).

        The attention's position term needs ``q_pos = -scale * W_p^T q`` per head (see
        :meth:`_attention`); q is a 1x1 projection of the input, so q_pos is one too, with
        weight ``-scale * W_p^T W_q`` (per head) and bias ``-scale * W_p^T b_q``: computed with
        q/k/v by one matrix product instead of elementwise passes over q.
        """
        dim, head = self.head_dim, self.head
        weight, bias = self._qkv_projection()
        w_p = self.conv_p.weight.view(dim, 2) * -(dim ** -0.5)
        w_q = self.conv1.weight.view(head, dim, self.in_channels)
        w_pos = torch.einsum('hdi,dc->hci', w_q, w_p).reshape(2 * head, self.in_channels)
        b_pos = (self.conv1.bias.view(head, dim) @ w_p).reshape(2 * head)
        return (torch.cat([weight.view(-1, self.in_channels), w_pos]), torch.cat([bias, b_pos]))

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward through the fused C++ op (:mod:`acmix_mm.ops.cpp_fused`)."""
        h, w = x.shape[-2:]
        weight, bias = self._fused_projection()
        proj = project(x, weight, bias)
        rate1 = self.rate1 + 0.0 * self.conv_p.bias.sum()  # see forward
        coord_x = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)
        coord_y = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)
        return cpp_acmix_branches(proj, self._conv_kernel(), rate1, coord_x, coord_y, self.head,
                                  self.kernel_att, self.dep_conv.dilation[0],
                                  self.dep_conv.stride[0], self.head_dim ** -0.5)

    def _conv_kernel(self) -> torch.Tensor:
        """``rate2`` times the product kernel of ``fc`` and ``dep_conv`` (see
        :meth:`_convolution`): (C_out, 3*head, kernel_conv, kernel_conv)."""
        k2 = self.kernel_conv * self.kernel_conv
        fc_weight = self.fc.weight.view(k2, 3 * self.head)
        return torch.einsum('otyx,tj->ojyx', self.dep_conv.weight, fc_weight) * self.rate2

    def _convolution(self, qkv: torch.Tensor) -> torch.Tensor:
        """``rate2`` times the shift branch on the (head_dim, 3*head)-ordered qkv:
        (B, C_out, H_out, W_out).

        The authors apply ``fc`` (1x1 over the 3*head stack, to kernel_conv**2 maps per
        head_dim row) and then ``dep_conv`` (grouped by head_dim). Both are linear, so they
        are applied as one grouped conv whose kernel is their product,
        ``W[o, j] = sum_t dep_conv[o, t] * fc[t, j]``: the same function with no
        (B, head_dim * kernel_conv**2, H, W) intermediate to store or keep for backward.
        ``rate2`` scales that small kernel instead of the output map (one pass less each way).
        """
        return shift_conv(qkv, self._conv_kernel(), self.head_dim, self.dep_conv.stride[0],
                          self.dep_conv.dilation[0], impl=self.conv_impl)

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Local-attention branch. (B, C_out, H_out, W_out) in qkv's dtype."""
        b, _, h, w = qkv.shape
        s, dim = self.dep_conv.stride[0], self.head_dim
        out_dtype = qkv.dtype
        # Half-precision logits overflow easily (|q.k| > 65504); compute the branch in fp32.
        compute_dtype = torch.float32 if out_dtype in _HALF_DTYPES else out_dtype
        qkv = qkv.to(compute_dtype)
        # Views of qkv: the attention kernel saves these rather than copies.
        q, k, v = qkv.view(b, dim, 3, self.head, h, w).permute(2, 0, 3, 1, 4, 5).unbind(0)
        # q, k, v: (B, head, dim, H, W) each
        q = q[..., ::s, ::s]
        scale = dim ** -0.5

        # q . (pe_i - pe_j) = (W_p^T q) . (c_i - c_j); the c_i part is constant over the window
        # (the softmax drops it), leaving -(W_p^T q) . c_j. Elementwise, not einsum: autocast
        # would run a matmul in half precision.
        w_p = self.conv_p.weight.to(compute_dtype).view(dim, 2) * -scale
        q_pos = torch.stack([(q * w_p[:, c].view(dim, 1, 1)).sum(2) for c in range(2)], dim=2)
        coord_x = torch.linspace(-1.0, 1.0, w, dtype=compute_dtype, device=qkv.device)
        coord_y = torch.linspace(-1.0, 1.0, h, dtype=compute_dtype, device=qkv.device)
        out = local_attention(q, k, v, q_pos, coord_x, coord_y, self.kernel_att,
                              self.dep_conv.dilation[0], s, scale, impl=self.attn_impl)
        out = out.reshape(b, self.out_channels, *out.shape[-2:])
        return out.to(out_dtype)
