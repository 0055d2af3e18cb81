"""ResNet-ACMix: a torchvision-style ResNet v1.5 whose bottleneck 3x3 convs are ACMix layers.

From Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022
(arXiv:2111.14556), Sec. 4.1: in every bottleneck the middle 3x3 convolution is replaced by
``ACMix(width, width, kernel_att=7, head=4, kernel_conv=3, stride)``. Depths 26/38/50 are the
paper's; 101 uses the usual ResNet-101 layout.

:class:`ResNetACMix` takes mmdet ``ResNet``'s arguments with the same meaning, so that a detector
or segmentor config swaps its backbone by changing ``type`` and ``depth``. Its module names are
torchvision's (``conv1``, ``bn1``, ``layer1.0.conv2.<ACMix names>``, ``layer1.0.downsample.0``),
which are also the authors' checkpoint keys: their ImageNet state_dict loads with only the
``fc.*`` classifier left over.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from torch.nn.modules.batchnorm import _BatchNorm

from ...checkpoint import convert_resnet_authors, load_backbone_weights, take_replaced_convs
from ...ops import ACMix, ShiftConv2d
from ...registry import MODELS
from .base import (ACMixBackbone, check_bool, check_init_cfg, check_int, check_out_indices,
                   check_per_stage)

__all__ = ['ResNetACMix', 'ACMixBottleneck', 'build_norm']

# Blocks per stage for each supported depth (paper Table 1 for 26/38/50; ResNet-101 layout).
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}

# Norm layers this backbone builds itself, so that it needs neither mmcv nor mmdet/mmseg.
# torch's SyncBatchNorm falls back to plain batch norm when no process group is initialised
# (single-process CPU runs, tests), so 'SyncBN' configs run unchanged outside DDP.
_NORM_TYPES: dict[str, type[nn.Module]] = {
    'BN': nn.BatchNorm2d,
    'BN2d': nn.BatchNorm2d,
    'SyncBN': nn.SyncBatchNorm,
    'GN': nn.GroupNorm,
}


def build_norm(norm_cfg: dict, num_features: int) -> nn.Module:
    """Build a 2d norm layer from an mmcv-style config.

    Args:
        norm_cfg: ``dict(type=..., requires_grad=True, **layer_kwargs)``; ``type`` is one of
            ``'BN'``, ``'BN2d'``, ``'SyncBN'`` or ``'GN'`` (``'GN'`` needs ``num_groups``).
            ``requires_grad=False`` freezes the affine parameters.
        num_features: channels C of the (B, C, H, W) input.
    """
    if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
        raise TypeError(f'norm_cfg must be a dict with a "type" key, got {norm_cfg!r}')
    cfg = dict(norm_cfg)
    norm_type = cfg.pop('type')
    requires_grad = cfg.pop('requires_grad', True)
    if norm_type not in _NORM_TYPES:
        raise ValueError(f'norm_cfg type {norm_type!r} is not supported by ResNetACMix; '
                         f'allowed: {sorted(_NORM_TYPES)}')
    if norm_type == 'GN':
        if 'num_groups' not in cfg:
            raise ValueError(f'norm_cfg {norm_cfg!r}: GN needs num_groups')
        layer = nn.GroupNorm(num_channels=num_features, **cfg)
    else:
        layer = _NORM_TYPES[norm_type](num_features, **cfg)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer


class ACMixBottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the middle conv) with an ACMix middle layer.

    1x1 conv -> norm -> ReLU -> ACMix (or a plain 3x3 conv) -> norm -> ReLU -> 1x1 conv -> norm,
    plus the (optionally downsampled) identity, then ReLU. Maps (B, in_channels, H, W) to
    (B, 4 * width, ceil(H / stride), ceil(W / stride)).

    Args:
        in_channels: input channels.
        width: channels of the middle layer; the block outputs ``4 * width``.
        stride: stride of the middle layer (and of the downsample path).
        dilation: dilation of the middle layer.
        downsample: module mapping the identity to the output's shape, or None.
        use_acmix: ACMix middle layer when True, a plain 3x3 conv (also named ``conv2``) when False.
        norm_cfg: see :func:`build_norm`.
        with_cp: recompute the block in backward (gradient checkpointing) to save memory.
        kernel_att, head, kernel_conv, attn_impl, conv_impl: passed to
            :class:`acmix_mm.ops.ACMix`.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, use_acmix: bool = True,
                 norm_cfg: Optional[dict] = None, with_cp: bool = False, kernel_att: int = 7,
                 head: int = 4, kernel_conv: int = 3, attn_impl: str = 'auto',
                 conv_impl: str = 'auto') -> None:
        super().__init__()
        norm_cfg = dict(type='BN', requires_grad=True) if norm_cfg is None else norm_cfg
        out_channels = width * self.expansion
        self.with_cp = with_cp
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = build_norm(norm_cfg, width)
        if use_acmix:
            self.conv2 = ACMix(width, width, kernel_att=kernel_att, head=head,
                               kernel_conv=kernel_conv, stride=stride, dilation=dilation,
                               attn_impl=attn_impl, conv_impl=conv_impl)
        else:
            self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=dilation,
                                   dilation=dilation, bias=False)
        self.bn2 = build_norm(norm_cfg, width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = build_norm(norm_cfg, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self._residual, x, use_reentrant=False)
        else:
            out = self._residual(x)
        return self.relu(out)


@MODELS.register_module()
class ResNetACMix(ACMixBackbone):
    """ResNet-ACMix backbone (Pan et al., CVPR 2022) with mmdet ``ResNet``'s interface.

    Maps an image batch (B, in_channels, H, W) to a tuple with one feature map per index in
    ``out_indices``: stage i gives (B, 4 * base_channels * 2**i, H / s_i, W / s_i) with
    s_i = 4 * strides[0] * ... * strides[i], sizes rounded up (a 63x97 input gives 16x25 at
    stride 4).

    Norm layers keep torchvision's names (``bn1``, ``bn2``, ``bn3``, ``downsample.1``) whatever
    their type, so checkpoints load across norm types (mmdet would call GN layers ``gn1``...).
    Unlike mmdet's ResNet, ``norm_eval`` defaults to False: there are no released ImageNet
    weights whose statistics would be worth freezing.

    Args:
        depth: 26, 38, 50 or 101.
        in_channels: channels of the input image.
        stem_channels: channels of the 7x7 stem conv; None: ``base_channels``.
        base_channels: middle width of stage 0; stage i is ``base_channels * 2**i`` wide and
            outputs 4x that. Every stage width with ACMix must be divisible by ``head``.
        num_stages: number of residual stages, 1 to 4.
        strides: stride of each stage's first block; None: (1, 2, 2, 2) cut to ``num_stages``.
        dilations: dilation of each stage's middle layers; None: all 1. Dilated stages
            (mmseg's output-stride-8 ResNets) pass the dilation to ACMix.
        out_indices: stages whose output is returned, each in [0, num_stages).
        style: only 'pytorch' (stride on the middle layer, ResNet v1.5) exists for ACMix.
        frozen_stages: freeze the stem (0) and stages 1..frozen_stages (parameters stop
            requiring grad, norms stay in eval mode); -1 freezes nothing.
        norm_cfg: norm layers, see :func:`build_norm`.
        norm_eval: keep every batch norm in eval mode (frozen running statistics) in train().
        with_cp: gradient checkpointing in every block.
        zero_init_residual: start each block's last norm at zero (the block is an identity).
        pretrained: deprecated, use ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg: None (kaiming convs, unit norms, then ACMix's shift init of ``dep_conv``),
            ``dict(type='Pretrained', checkpoint=PATH)`` (loaded safely, the classifier ``fc.*``
            dropped and reported), or any other mmengine init config.
        acmix_stages: per stage, ACMix middle layers (True) or plain 3x3 convs (False).
        kernel_att, head, kernel_conv, attn_impl, conv_impl: passed to every
            :class:`acmix_mm.ops.ACMix`.
    """

    def __init__(self,
                 depth: int,
                 in_channels: int = 3,
                 stem_channels: Optional[int] = None,
                 base_channels: int = 64,
                 num_stages: int = 4,
                 strides: Optional[Sequence[int]] = None,
                 dilations: Optional[Sequence[int]] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 style: str = 'pytorch',
                 frozen_stages: int = -1,
                 norm_cfg: Optional[dict] = None,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 zero_init_residual: bool = True,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None,
                 acmix_stages: Optional[Sequence[bool]] = None,
                 kernel_att: int = 7,
                 head: int = 4,
                 kernel_conv: int = 3,
                 attn_impl: str = 'auto',
                 conv_impl: str = 'auto') -> None:
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f'invalid depth {depth!r} ({type(depth).__name__}) for ResNetACMix: '
                            f'depth is an int; allowed: {sorted(STAGE_BLOCKS)}')
        if depth not in STAGE_BLOCKS:
            raise ValueError(f'invalid depth {depth!r} for ResNetACMix; '
                             f'allowed: {sorted(STAGE_BLOCKS)}')
        if pretrained is not None and init_cfg is not None:
            raise ValueError('pretrained and init_cfg cannot both be set; '
                             'use init_cfg=dict(type="Pretrained", checkpoint=...)')
        if pretrained is not None:
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a str path or None, got {pretrained!r}')
            warnings.warn('ResNetACMix: pretrained is deprecated, '
                          'use init_cfg=dict(type="Pretrained", checkpoint=...)',
                          DeprecationWarning, stacklevel=2)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        check_init_cfg(init_cfg)
        super().__init__(init_cfg)

        self.depth = depth
        check_int('in_channels', in_channels, 1)
        self.base_channels = check_int('base_channels', base_channels, 1)
        self.stem_channels = base_channels if stem_channels is None else check_int(
            'stem_channels', stem_channels, 1)
        self.num_stages = check_int('num_stages', num_stages, 1, 4)
        positive = lambda n, v: check_int(n, v, 1)  # noqa: E731
        self.strides = check_per_stage('strides', strides, num_stages, (1, 2, 2, 2), positive)
        self.dilations = check_per_stage('dilations', dilations, num_stages, (1, 1, 1, 1), positive)
        self.acmix_stages = check_per_stage('acmix_stages', acmix_stages, num_stages,
                                            (True,) * 4, check_bool)
        self.out_indices = check_out_indices(out_indices, num_stages)
        if style != 'pytorch':
            raise ValueError(f'style {style!r} is not supported: ResNetACMix only has '
                             f"style='pytorch' (stride on the middle ACMix layer, ResNet v1.5)")
        self.style = style
        self.frozen_stages = check_int('frozen_stages', frozen_stages, -1, num_stages)
        self.norm_cfg = dict(type='BN', requires_grad=True) if norm_cfg is None else norm_cfg
        self.norm_eval = check_bool('norm_eval', norm_eval)
        self.with_cp = check_bool('with_cp', with_cp)
        self.zero_init_residual = check_bool('zero_init_residual', zero_init_residual)
        check_int('head', head, 1)
        for i in range(num_stages):
            width = base_channels * 2**i
            if self.acmix_stages[i] and width % head:
                raise ValueError(f'head={head} must divide every ACMix stage width; stage {i} '
                                 f'is base_channels * 2**{i} = {width} wide')

        self.stage_blocks = STAGE_BLOCKS[depth][:num_stages]
        self.conv1 = nn.Conv2d(in_channels, self.stem_channels, kernel_size=7, stride=2,
                               padding=3, bias=False)
        self.bn1 = build_norm(self.norm_cfg, self.stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        block_kwargs = dict(norm_cfg=self.norm_cfg, with_cp=with_cp, kernel_att=kernel_att,
                            head=head, kernel_conv=kernel_conv, attn_impl=attn_impl,
                            conv_impl=conv_impl)
        channels = self.stem_channels
        self.res_layers: list[str] = []
        for i, num_blocks in enumerate(self.stage_blocks):
            width = base_channels * 2**i
            layer = self._make_stage(channels, width, num_blocks, self.strides[i],
                                     self.dilations[i], self.acmix_stages[i], block_kwargs)
            channels = width * ACMixBottleneck.expansion
            self.add_module(f'layer{i + 1}', layer)
            self.res_layers.append(f'layer{i + 1}')
        self.in_channels = in_channels
        self.out_channels = tuple(base_channels * 2**i * ACMixBottleneck.expansion
                                  for i in self.out_indices)
        self._freeze_stages()

    @staticmethod
    def _make_stage(in_channels: int, width: int, num_blocks: int, stride: int, dilation: int,
                    use_acmix: bool, block_kwargs: dict) -> nn.Sequential:
        out_channels = width * ACMixBottleneck.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                build_norm(block_kwargs['norm_cfg'], out_channels))
        blocks = [ACMixBottleneck(in_channels, width, stride, dilation, downsample, use_acmix,
                                  **block_kwargs)]
        blocks += [ACMixBottleneck(out_channels, width, 1, dilation, None, use_acmix,
                                   **block_kwargs) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    # ------------------------------------------------------------------ init
    def _default_init(self) -> None:
        for m in self.modules():
            # dep_conv (a ShiftConv2d) still takes its kaiming draw before the shift reset below:
            # a seeded init then draws the same numbers as before dep_conv stopped being a Conv2d,
            # so seeded results (the demos, calibrated tests) stay what they were.
            if isinstance(m, (nn.Conv2d, ShiftConv2d)):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, ACMixBottleneck):
                    nn.init.zeros_(m.bn3.weight)
        self._reset_acmix()

    def _reset_acmix(self) -> None:
        # ACMix.reset_parameters restores the shift kernel of dep_conv and rate1 = rate2 = 0.5.
        for m in self.modules():
            if isinstance(m, ACMix):
                m.reset_parameters()

    def load_pretrained(self, path: str):
        """Load ImageNet weights safely: a ResNet-ACMix file, or a stock ResNet of this depth.

        Accepted: the authors' layout (``{'model': state_dict, ...}``, keys as here); a stock
        torchvision ResNet (``torchvision://resnet50``, a URL or a local file); mmdet/mmpretrain
        files (``backbone.`` prefix) and mmengine / Lightning wrappers (see
        :mod:`acmix_mm.checkpoint.layouts`). The classifier ``fc.*`` is dropped. From a stock
        file, every layer that both networks have loads exactly; the 3x3 conv weights where
        ACMix layers stand are dropped as unused and the ACMix layers keep their init
        (:func:`~acmix_mm.checkpoint.layouts.take_replaced_convs`). The summary is logged in one
        line. Any other missing, unexpected or mis-shaped key (a file of another depth or
        family) raises ``CheckpointError`` before anything is loaded.

        Returns:
            The :class:`acmix_mm.checkpoint.LoadReport`.
        """
        def converter(state):
            state, report = convert_resnet_authors(state)
            return take_replaced_convs(state, self, report), report
        report = load_backbone_weights(self, path, converter=converter)
        frozen = tuple(f'layer{i}.' for i in range(1, self.frozen_stages + 1))
        stuck = [name for name in report.replaced_layers if frozen and name.startswith(frozen)]
        if stuck:
            from mmengine.logging import print_log
            print_log(f'ResNetACMix: frozen_stages={self.frozen_stages} freezes {len(stuck)} ACMix '
                      f'layers that {path} leaves at their init ({", ".join(stuck)}): they will '
                      f'never train. Use frozen_stages=0 (the stem only) with a stock ResNet file.',
                      logger='current', level=logging.WARNING)
        return report

    # --------------------------------------------------------------- forward
    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.conv1, self.bn1]
        frozen += [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]
        for m in frozen:
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'ResNetACMix':
        """Switch to train/eval mode, keeping frozen stages and (if ``norm_eval``) norms in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> one (B, C_i, H_i, W_i) map per index in ``out_indices``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'ResNetACMix expects a (B, {self.in_channels}, H, W) input, '
                             f'got shape {tuple(x.shape)}')
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
