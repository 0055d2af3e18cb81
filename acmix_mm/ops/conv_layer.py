"""ACMix as a conv layer type: what mmcv's ``build_conv_layer`` builds for ``type='ACMix'``.

``build_conv_layer(cfg, *args, **kwargs)`` calls the registered type with a conv's arguments
(``in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias``) plus the
rest of ``cfg``. :func:`build_acmix_conv` is that type (registered as ``ACMix`` by
:mod:`acmix_mm.models.layers`), so that ACMix replaces a conv wherever a config can name one:

- a stock ResNet's 3x3 convs, the way DCN enters it:
  ``backbone=dict(dcn=dict(type='acmix_mm.ACMix'), stage_with_dcn=(False, True, True, True))``;
- any ``ConvModule``: ``conv_cfg=dict(type='acmix_mm.ACMix')`` (an FPN's output convs, a
  decode head's 3x3 convs).

ACMix (Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022) computes
q, k, v with 1x1 convs and sums a 7x7 local attention and a shift convolution over them; see
:class:`acmix_mm.ops.ACMix`, whose parameter names :class:`ACMixConv2d` keeps.
"""
from __future__ import annotations

import difflib
import numbers
from typing import Optional, Tuple, Union

from torch import nn

from .acmix import ACMix

__all__ = ['ACMixConv2d', 'build_acmix_conv']

IntPair = Union[int, Tuple[int, int]]

# What build_conv_layer's callers pass, and ACMix's own keys a config may add.
CONV_KEYS = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
             'groups', 'bias')
ACMIX_KEYS = ('kernel_att', 'head', 'attn_impl', 'conv_impl')


def _square(name: str, value: object) -> int:
    """One int from an int or a pair of equal ints (a conv's ``3`` or ``(3, 3)``)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'ACMix conv layer: {name} must be an int or a pair of equal ints '
                         f'(ACMix is square), got {value!r}')
    return int(value)


class ACMixConv2d(ACMix):
    """ACMix with a conv's constructor: (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s)).

    It replaces ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation)``
    whose padding keeps the map's size (``padding = dilation * (kernel_size - 1) // 2``).

    Args:
        in_channels, out_channels: as the conv's; ``out_channels`` must be divisible by ``head``.
        kernel_size: the conv's kernel, an odd int (or equal pair): it becomes ACMix's
            ``kernel_conv``, the shift branch's kernel. The attention window is ``kernel_att``.
        stride, dilation: as the conv's (ints or equal pairs).
        padding: None (the size-keeping padding) or exactly that value; any other raises
            ``ValueError``, since ACMix's output size is fixed at ceil(H / stride).
        groups: 1 only. ACMix's q/k/v projections are dense and its shift branch mixes all
            heads, so there is no grouped ACMix; a grouped conv (ResNeXt's) raises ``ValueError``.
        bias: accepted for the conv's callers; either value gives the same layer, with the
            biases of ACMix's q/k/v 1x1 convs (the authors' layer, parameter names unchanged).
            With ``bias=True`` the value projection's bias already is a learnable per-channel
            output offset (exactly so in the attention branch: softmax weights sum to 1), so no
            separate output bias is added; with ``bias=False`` (a norm follows) the q/k/v biases
            stay, as in the authors' ResNet.
        kernel_att, head, attn_impl, conv_impl: ACMix's own keys (see
            :class:`acmix_mm.ops.ACMix`).

    Attributes read by ``ConvModule`` and by code that handles convs: ``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation`` (pairs, as
    ``nn.Conv2d``'s), ``groups`` (1), ``transposed`` (False), ``output_padding`` ((0, 0)),
    ``bias`` (None: there is no single conv bias).

    :meth:`init_weights` restores ACMix's own initialisation (rate1 = rate2 = 0.5, ``dep_conv`` as
    a shift) after a parent's initialiser; mmengine calls it on its parent's ``init_weights``
    before any ``Pretrained`` weights are loaded.
    """

    transposed = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair = 1, padding: Optional[IntPair] = None, dilation: IntPair = 1,
                 groups: int = 1, bias: bool = True, *, kernel_att: int = 7, head: int = 4,
                 attn_impl: str = 'auto', conv_impl: str = 'auto') -> None:
        k = _square('kernel_size', kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f'ACMix conv layer: kernel_size must be odd and positive (it is the '
                             f'shift branch\'s centred kernel), got {kernel_size!r}')
        if groups != 1:
            raise ValueError(
                f'ACMix conv layer: groups={groups!r} is not supported; allowed: 1. ACMix replaces '
                f'a dense conv: its q/k/v projections are dense and its shift branch mixes all '
                f'heads, so a grouped conv (e.g. ResNeXt\'s 3x3) has no ACMix counterpart. Use a '
                f'ResNet, or leave the grouped stages out of stage_with_dcn')
        if not isinstance(bias, bool):
            raise ValueError(f'ACMix conv layer: bias must be True or False, got {bias!r}')
        # ACMix checks stride and dilation (positive ints) and builds dep_conv, whose geometry
        # (pairs, the size-keeping padding) is the conv's.
        super().__init__(in_channels, out_channels, kernel_att=kernel_att, head=head,
                         kernel_conv=k, stride=_square('stride', stride),
                         dilation=_square('dilation', dilation), attn_impl=attn_impl,
                         conv_impl=conv_impl)
        geometry = self.dep_conv
        if padding is not None and _square('padding', padding) != geometry.padding[0]:
            raise ValueError(
                f'ACMix conv layer: padding={padding!r} would not give the output size of the conv '
                f'it replaces; ACMix outputs ceil(H / stride), which a conv gets with padding = '
                f'dilation * (kernel_size - 1) // 2 = {geometry.padding[0]} here (kernel_size={k}, '
                f'dilation={geometry.dilation[0]}). Allowed: None or {geometry.padding[0]}')
        self.kernel_size = geometry.kernel_size
        self.stride = geometry.stride
        self.padding = geometry.padding
        self.dilation = geometry.dilation
        self.groups = 1
        self.output_padding = (0, 0)
        self.bias = None

    def init_weights(self) -> None:
        """rate1 = rate2 = 0.5 and the shift kernel in ``dep_conv``; the 1x1 convs keep theirs."""
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'kernel_att={self.kernel_att}, head={self.head}, attn_impl={self.attn_impl!r}, '
                f'conv_impl={self.conv_impl!r}')


def build_acmix_conv(in_channels: int, out_channels: int, kernel_size: IntPair,
                     stride: IntPair = 1, padding: Optional[IntPair] = None,
                     dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                     **acmix_kwargs) -> nn.Module:
    """The ``ACMix`` conv layer type: an :class:`ACMixConv2d`, or a plain conv for 1x1 kernels.

    A 1x1 conv mixes channels only; ACMix's point is spatial mixing, and the modules that take
    one ``conv_cfg`` for all their convs (an FPN's 1x1 laterals beside its 3x3 outputs, a head's
    1x1 classifier) would otherwise turn every 1x1 conv into a 7x7 attention. So
    ``kernel_size=1`` builds ``nn.Conv2d`` with the given arguments (padding None means 0), as
    ``type='Conv2d'`` would; every other kernel builds :class:`ACMixConv2d`.

    Args:
        acmix_kwargs: ACMix's own keys from the config (``kernel_att``, ``head``,
            ``attn_impl``, ``conv_impl``); an unknown key raises ``TypeError`` naming it and the allowed keys.
    """
    unknown = sorted(set(acmix_kwargs) - set(ACMIX_KEYS))
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, CONV_KEYS + ACMIX_KEYS, n=1)
            named.append(repr(key) + (f' (did you mean {close[0]!r}?)' if close else ''))
        raise TypeError(f'conv layer ACMix got unknown key {", ".join(named)}; '
                        f'allowed: {", ".join(CONV_KEYS + ACMIX_KEYS)}')
    if _square('kernel_size', kernel_size) == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0 if padding is None else padding, dilation=dilation,
                         groups=groups, bias=bias)
    return ACMixConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                       dilation=dilation, groups=groups, bias=bias, **acmix_kwargs)
