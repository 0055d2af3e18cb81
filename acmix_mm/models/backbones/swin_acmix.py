"""Swin-ACMix: a Swin Transformer whose window attention is ACMix's (Pan et al., CVPR 2022).

ACMix ("On the Integration of Self-Attention and Convolution", arXiv 2111.14556) shares the
``qkv`` projection between two branches:

* attention: ordinary Swin window attention (relative position bias, shifted-window mask),
  followed by ``proj``;
* convolution ("shift"): ``qkv`` viewed as 3*heads maps of head_dim channels, mixed by a 1x1
  conv ``fc`` (3*heads -> 9, with bias) into the 9 taps of a 3x3 kernel, then a grouped 3x3
  ``dep_conv`` (groups = head_dim, initialised as a shift) back to ``dim`` channels. It runs on
  the whole (cyclically shifted, padded) map, not per window.

Output: ``rate1 * proj(attention) + rate2 * conv``, then the projection dropout.

Unlike the authors' release (fixed 224x224 input), this backbone takes any input size, like
mmdet's ``SwinTransformer``: the image is padded to the patch size, each block's map to the
window size (bottom/right, zeros), shifted-window masks are computed for the padded size, and
odd maps are padded before patch merging. Where a padded map is involved, the conv branch sees
zeros at the padded positions (as it sees at its own zero-padded border).

Small maps: when a stage's map fits in one window (H <= window and W <= window), the block uses
a single (H, W) window with no shift and no padding (the relative position bias reads the
offsets it needs from the same table). At 224x224 input this is exactly the authors' rule
(stage 4: 7x7 map, window 7, no shift), so their checkpoints reproduce their outputs. Larger
maps follow mmdet: window ``window_size``, padded, shifted in every second block.

Parameter names are the authors' inside a block (``attn.qkv``, ``attn.fc``, ``attn.dep_conv``,
``attn.rate1``...), with mmdet's outer layout: ``patch_embed``, ``stages.i.blocks.j``,
``stages.i.downsample``, and one output norm ``norm{i}`` per index in ``out_indices``.
"""
from __future__ import annotations

import functools
import numbers
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model.weight_init import trunc_normal_
from torch import nn

from ...checkpoint import convert_swin_authors, load_backbone_weights
from ...registry import MODELS
from .base import ACMixBackbone, check_bool, check_float, check_init_cfg, check_int, check_sequence

__all__ = ['SwinACMix', 'ACMixWindowAttention', 'SwinACMixBlock']

HW = Tuple[int, int]


# ----------------------------------------------------------------------------- helpers
class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f'p={self.p}'


@functools.lru_cache(maxsize=32)
def relative_position_index(wh: int, ww: int, table_side: int) -> torch.Tensor:
    """Index into a ((2*table_side-1)**2, heads) bias table for every pair of a wh x ww window.

    Returns:
        (wh*ww, wh*ww) long tensor (CPU). Row i, column j: the entry of offset (y_i - y_j,
        x_i - x_j), offsets shifted by table_side - 1 and laid out row-major.
    """
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (table_side - 1)  # (2, N, N)
    return rel[0] * (2 * table_side - 1) + rel[1]


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) with H % wh == W % ww == 0 -> (B * nW, wh * ww, C), windows row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shifted_window_mask(H: int, W: int, window: int, shift: int,
                        device: torch.device) -> torch.Tensor:
    """Additive mask of Swin's shifted windows for a padded (H, W) map (-100 across regions).

    Returns:
        (nW, window**2, window**2) float tensor: 0 where query and key come from the same region
        of the un-shifted map, -100 otherwise.
    """
    regions = torch.zeros((1, H, W, 1), device=device)
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in spans:
        for ws in spans:
            regions[:, hs, ws, :] = label
            label += 1
    regions = window_partition(regions, window, window).squeeze(-1)  # (nW, N)
    diff = regions[:, None, :] - regions[:, :, None]
    return diff.ne(0).float() * -100.0


# ----------------------------------------------------------------------------- attention
class ACMixWindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention with ACMix's convolution branch.

    Args:
        dim: channels C.
        num_heads: attention heads; C must be divisible by it.
        window_size: side of the square window (and of the relative position bias table's
            (2*window_size-1)**2 offsets).
        qkv_bias: bias in the ``qkv`` Linear.
        qk_scale: query scale; None means head_dim ** -0.5.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout on the block's attention output (after mixing the branches).
        use_acmix: add the convolution branch (``fc``, ``dep_conv``, ``rate1``, ``rate2``);
            False gives plain Swin window attention.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 use_acmix: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.use_acmix = use_acmix
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if use_acmix:
            self.rate1 = nn.Parameter(torch.empty(1))
            self.rate2 = nn.Parameter(torch.empty(1))
            self.fc = nn.Conv2d(3 * num_heads, 9, kernel_size=1, bias=True)
            self.dep_conv = nn.Conv2d(9 * self.head_dim, dim, kernel_size=3, padding=1,
                                      groups=self.head_dim, bias=False)
            self.reset_acmix()

    def reset_acmix(self) -> None:
        """ACMix's init: rate1 = rate2 = 0.5 and ``dep_conv`` as a shift (tap t -> offset t)."""
        if not self.use_acmix:
            return
        with torch.no_grad():
            self.rate1.fill_(0.5)
            self.rate2.fill_(0.5)
            kernel = torch.zeros(9, 3, 3)
            for t in range(9):
                kernel[t, t // 3, t % 3] = 1.0
            self.dep_conv.weight.copy_(kernel.expand(self.dim, 9, 3, 3))

    def _bias(self, wh: int, ww: int) -> torch.Tensor:
        index = relative_position_index(wh, ww, self.window_size).to(
            self.relative_position_bias_table.device)
        n = wh * ww
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)  # (heads, N, N)

    def _attention(self, qkv: torch.Tensor, wh: int, ww: int,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Window attention + proj: qkv (B, Hp, Wp, 3C) -> (B, Hp, Wp, C).

        For float16 activations (autocast or a half model) the logits, softmax and weighted sum
        run in float32 with autocast off: float16 logits overflow beyond 65504, which a scaled
        input or large q/k weights reach. bfloat16 has float32's range and stays in bfloat16.
        """
        B, Hp, Wp, _ = qkv.shape
        n = wh * ww
        out_dtype = qkv.dtype
        compute = torch.float32 if out_dtype == torch.float16 else out_dtype
        windows = window_partition(qkv, wh, ww).to(compute)  # (B*nW, N, 3C)
        q, k, v = windows.view(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        with torch.autocast(qkv.device.type, enabled=False):
            attn = (q * self.scale) @ k.transpose(-2, -1) + self._bias(wh, ww).to(compute)[None]
            if mask is not None:
                nw = mask.shape[0]
                attn = (attn.view(-1, nw, self.num_heads, n, n) + mask.to(compute)[None, :, None]).view(
                    -1, self.num_heads, n, n)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = (attn @ v).transpose(1, 2).reshape(-1, n, self.dim)
        return window_reverse(self.proj(out.to(out_dtype)), wh, ww, Hp, Wp)

    def _convolution(self, qkv: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """ACMix's conv branch on the whole map: qkv (B, Hp, Wp, 3C) -> (B, Hp, Wp, C).

        ``valid`` (Hp, Wp), 1 on real pixels and 0 on padding, zeroes the padded positions of
        ``dep_conv``'s input (``fc``'s output, bias included) so that padding looks like the
        conv's own zero border.

        Both paths keep the tensors channels-last (the layout qkv already has), so no NCHW copy
        is made; CPU convolutions are also faster so (2.5x for this grouped conv). With few heads
        (3 * heads * 9 <= 9 + 81: Swin-T's stage 1), ``fc`` and ``dep_conv`` run as one grouped
        conv with their product kernel (:meth:`_convolution_fused`), which costs no more
        multiply-accumulates and skips the (B, 9 * head_dim, Hp, Wp) intermediate; otherwise
        ``fc`` is a small matmul then ``dep_conv`` (:meth:`_convolution_two_step`).
        """
        if 3 * self.num_heads * 9 <= 9 + 81:
            return self._convolution_fused(qkv, valid)
        return self._convolution_two_step(qkv, valid)

    def _convolution_two_step(self, qkv: torch.Tensor, valid: Optional[torch.Tensor]
                              ) -> torch.Tensor:
        """``fc`` then ``dep_conv``, channels-last: (B, Hp, Wp, 3C) -> (B, Hp, Wp, C)."""
        B, Hp, Wp, _ = qkv.shape
        # fc mixes the 3*heads maps (order: q heads, k heads, v heads) into 9 taps; channel
        # d*9 + t of dep_conv's input is tap t of head-dim d: (B, Hp, Wp, d, 9) is exactly
        # that input in channels-last layout.
        groups = qkv.view(B, Hp, Wp, 3 * self.num_heads, self.head_dim).transpose(-1, -2)
        taps = F.linear(groups, self.fc.weight.view(9, 3 * self.num_heads), self.fc.bias)
        taps = taps.reshape(B, Hp, Wp, self.head_dim * 9).permute(0, 3, 1, 2)
        if valid is not None:
            taps = taps * valid
        return self.dep_conv(taps).permute(0, 2, 3, 1)

    def _convolution_fused(self, qkv: torch.Tensor, valid: Optional[torch.Tensor]
                           ) -> torch.Tensor:
        """``fc`` and ``dep_conv`` as one grouped conv: (B, Hp, Wp, 3C) -> (B, Hp, Wp, C).

        Both are linear, so ``dep_conv(mask * (fc(x) + b))`` = ``conv(mask * x, W)`` +
        ``conv(mask, K)`` with ``W[o, j] = sum_t dep_conv[o, t] * fc[t, j]`` (groups = head_dim,
        3*heads inputs each) and ``K[o] = sum_t dep_conv[o, t] * b_t`` (the bias, which the
        zero border and the padding mask make position-dependent).
        """
        B, Hp, Wp, _ = qkv.shape
        stack = 3 * self.num_heads
        # Channels (j, d) -> (d, j): each dep_conv group reads one head-dim row's 3*heads maps.
        x = qkv.view(B, Hp, Wp, stack, self.head_dim).transpose(-1, -2)
        x = x.reshape(B, Hp, Wp, stack * self.head_dim).permute(0, 3, 1, 2)
        mask = valid if valid is not None else qkv.new_ones(Hp, Wp)
        if valid is not None:
            x = x * valid
        dep = self.dep_conv.weight  # (C, 9, 3, 3)
        fc_weight = self.fc.weight.view(9, stack)
        weight = torch.einsum('otyx,tj->ojyx', dep, fc_weight)
        out = F.conv2d(x, weight, None, 1, 1, 1, self.head_dim)
        bias_kernel = torch.einsum('otyx,t->oyx', dep, self.fc.bias).unsqueeze(1)
        out = out + F.conv2d(mask.view(1, 1, Hp, Wp), bias_kernel, None, 1, 1)
        return out.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, window: HW, shift: int) -> torch.Tensor:
        """Attend within windows of a (B, H, W, C) map; returns (B, H, W, C).

        Args:
            x: the block's normalised input, channels last.
            window: (wh, ww) window; the map is padded (bottom/right) to multiples of it.
            shift: cyclic shift (0: none); needs a square window.
        """
        B, H, W, C = x.shape
        wh, ww = window
        pad_b, pad_r = (-H) % wh, (-W) % ww
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        valid = None
        if self.use_acmix and (pad_b or pad_r):
            valid = x.new_zeros(Hp, Wp)
            valid[:H, :W] = 1.0
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            if valid is not None:
                valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
            mask = shifted_window_mask(Hp, Wp, wh, shift, x.device).to(x.dtype)
        qkv = self.qkv(x)
        out = self._attention(qkv, wh, ww, mask)
        if self.use_acmix:
            out = self.rate1 * out + self.rate2 * self._convolution(qkv, valid)
        out = self.proj_drop(out)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        if pad_b or pad_r:
            out = out[:, :H, :W].contiguous()
        return out


# ----------------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout, on (..., C)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinACMixBlock(nn.Module):
    """One Swin block: x + attn(norm1(x)), then x + mlp(norm2(x)), on (B, H*W, C) tokens.

    Args:
        dim, num_heads, window_size, qkv_bias, qk_scale, attn_drop, use_acmix: see
            :class:`ACMixWindowAttention`.
        shift: shift windows by window_size // 2 (where the map is larger than one window).
        mlp_ratio: hidden width of the MLP over ``dim``.
        drop: dropout after the attention output and in the MLP.
        drop_path: stochastic depth probability of both residual branches.
        with_cp: recompute the block in backward (gradient checkpointing).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 use_acmix: bool = True, with_cp: bool = False) -> None:
        super().__init__()
        self.window_size, self.shift, self.with_cp = window_size, shift, with_cp
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ACMixWindowAttention(dim, num_heads, window_size, qkv_bias, qk_scale,
                                         attn_drop, drop, use_acmix)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def window_and_shift(self, hw: HW) -> Tuple[HW, int]:
        """The window and shift used on an (H, W) map (see the module docstring)."""
        H, W = hw
        ws = self.window_size
        if H <= ws and W <= ws:
            return (H, W), 0
        return (ws, ws), (ws // 2 if self.shift else 0)

    def _forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        B, L, C = x.shape
        window, shift = self.window_and_shift(hw)
        attn = self.attn(self.norm1(x).view(B, hw[0], hw[1], C), window, shift)
        x = x + self.drop_path(attn.view(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        """(B, H*W, C) tokens of an (H, W) map -> (B, H*W, C)."""
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, hw, use_reentrant=False)
        return self._forward(x, hw)


class PatchMerging(nn.Module):
    """2x2 patch merging: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C).

    The four neighbours are concatenated in the authors' order (top-left, bottom-left, top-right,
    bottom-right), normalised, then reduced by a Linear without bias. Odd maps are zero-padded
    at the bottom/right first.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, hw: HW) -> Tuple[torch.Tensor, HW]:
        B, _, C = x.shape
        H, W = hw
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        out_hw = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.view(B, -1, 4 * C))), out_hw


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: (B, C_in, H, W) -> (B, ceil(H/p)*ceil(W/p), C).

    The image is zero-padded at the bottom/right to a multiple of the patch size.
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims) if norm else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, HW]:
        p = self.patch_size
        pad_b, pad_r = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw


class SwinACMixStage(nn.Module):
    """``depth`` blocks (shift in every second one), then an optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int,
                 drop_path: Sequence[float], downsample: bool, **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinACMixBlock(dim, num_heads, window_size, shift=bool(j % 2), drop_path=drop_path[j],
                           **block_kwargs) for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, hw: HW) -> Tuple[torch.Tensor, HW, torch.Tensor, HW]:
        """Returns (next stage's input, its (H, W), this stage's output, its (H, W))."""
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        down, down_hw = self.downsample(x, hw)
        return down, down_hw, x, hw


# ----------------------------------------------------------------------------- backbone
@MODELS.register_module()
class SwinACMix(ACMixBackbone):
    """Swin Transformer with ACMix window attention, for mmdet/mmseg (any input size).

    Args:
        arch: ``'tiny'`` (embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24)), ``'small'``
            (depths (2, 2, 18, 2)), or a dict with ``embed_dims``, ``depths``, ``num_heads``.
        in_channels: image channels.
        patch_size: patch embedding size and stride (pixels).
        window_size: attention window side (tokens).
        mlp_ratio: MLP hidden width over the stage width.
        qkv_bias, qk_scale: see :class:`ACMixWindowAttention`.
        drop_rate: dropout after the patch embedding, the attention output and in the MLPs.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        patch_norm: LayerNorm after the patch embedding (patch merging always has its norm,
            as in the authors' model).
        out_indices: stages whose outputs are returned, each through its own LayerNorm ``norm{i}``.
        frozen_stages: freeze the patch embedding (>= 0) and stages 0..frozen_stages-1 with their
            output norms; -1 freezes nothing.
        acmix_stages: stages that use ACMix attention, as indices ``(2, 3)`` or as one bool per
            stage ``(False, False, True, True)`` (ResNetACMix's form); the others use plain Swin
            attention. None: every stage.
        with_cp: gradient checkpointing in every block.
        pretrained: deprecated, use ``init_cfg``.
        init_cfg: None (the authors' init: truncated normal Linear/bias tables, LayerNorm 1/0,
            shift-initialised ``dep_conv``), ``dict(type='Pretrained', checkpoint=PATH)`` (loaded by
            :mod:`acmix_mm.checkpoint.layouts`: the authors' Swin-ACmix file or any file in this
            backbone's layout, nothing in it executed), or another mmengine init config.
    """

    arch_settings: Dict[str, dict] = {
        'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
        'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    }

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3, patch_size: int = 4,
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 patch_norm: bool = True, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, acmix_stages: Optional[Sequence[int]] = None,
                 with_cp: bool = False, pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        settings = self._arch(arch)
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either pretrained or init_cfg, not both')
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a path or None, got {type(pretrained).__name__}')
            warnings.warn('SwinACMix: pretrained is deprecated, use '
                          'init_cfg=dict(type="Pretrained", checkpoint=...)', DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        check_init_cfg(init_cfg)
        super().__init__(init_cfg=init_cfg)
        embed_dims, depths, num_heads = settings['embed_dims'], settings['depths'], settings['num_heads']
        num_stages = len(depths)
        for name, value, low in (('in_channels', in_channels, 1), ('patch_size', patch_size, 1),
                                 ('window_size', window_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'{name} must be an int >= {low}, got {value!r}')
        # Even windows are allowed, as in Swin (Swin-B at 384 px uses 12): the shift is
        # window_size // 2 and the relative position table covers every offset either way.
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
            raise ValueError(f'mlp_ratio must be a number > 0, got {mlp_ratio!r}')
        drop_path_rate = check_float('drop_path_rate', drop_path_rate, 0.0, 1.0)
        drop_rate = check_float('drop_rate', drop_rate, 0.0, 1.0)
        attn_drop_rate = check_float('attn_drop_rate', attn_drop_rate, 0.0, 1.0)
        if qk_scale is not None and (isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real)
                                     or not qk_scale > 0):
            raise ValueError(f'qk_scale must be None (head_dim ** -0.5) or a number > 0, got {qk_scale!r}')
        for name, value in (('qkv_bias', qkv_bias), ('patch_norm', patch_norm), ('with_cp', with_cp)):
            check_bool(name, value)
        if isinstance(out_indices, int) and not isinstance(out_indices, bool):
            raise TypeError(f'out_indices must be a list or tuple of stage indices in 0..{num_stages - 1}, '
                            f'got the int {out_indices}; for one stage write ({out_indices},)')
        out_indices = check_sequence('out_indices', out_indices, f'stage indices in 0..{num_stages - 1}')
        if not out_indices or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_stages
                                  for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of 0..{num_stages - 1}, '
                             f'got {out_indices}')
        if len(set(out_indices)) != len(out_indices):
            raise ValueError(f'out_indices has duplicates: {out_indices}; each stage may be output once')
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) \
                or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in -1..{num_stages}, got {frozen_stages!r}')
        acmix_stages = self._acmix_stages(acmix_stages, num_stages)
        self.embed_dims, self.depths, self.num_heads = embed_dims, tuple(depths), tuple(num_heads)
        self.in_channels, self.window_size = in_channels, window_size
        self.out_indices, self.frozen_stages = out_indices, frozen_stages
        self.acmix_stages, self.with_cp = acmix_stages, with_cp
        self.num_features = [embed_dims * 2 ** i for i in range(num_stages)]

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, patch_norm)
        self.drop_after_pos = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = self.num_features[i]
            if dim % heads:
                raise ValueError(f'stage {i}: width {dim} is not divisible by {heads} heads')
            self.stages.append(SwinACMixStage(
                dim, depth, heads, window_size, rates[sum(depths[:i]):sum(depths[:i + 1])],
                downsample=i < num_stages - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                use_acmix=i in acmix_stages, with_cp=with_cp))
        for i in out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self._freeze_stages()

    @staticmethod
    def _acmix_stages(acmix_stages, num_stages: int) -> Tuple[int, ...]:
        """Stage indices that use ACMix, from indices ``(2, 3)`` or per-stage bools ``(F, F, T, T)``.

        Per-stage bools are ResNetACMix's form; taken as indices they would silently mean
        stages 0 and 1 (``False == 0``, ``True == 1``), so a bool sequence must have one entry
        per stage and is converted here. Mixing bools and ints is refused.
        """
        if acmix_stages is None:
            return tuple(range(num_stages))
        what = f'stage indices in 0..{num_stages - 1} or {num_stages} bools (one per stage)'
        value = check_sequence('acmix_stages', acmix_stages, what)
        bools = [isinstance(v, bool) for v in value]
        if value and all(bools):
            if len(value) != num_stages:
                raise ValueError(f'acmix_stages as bools must have one entry per stage '
                                 f'({num_stages}), got {len(value)}: {value!r}')
            return tuple(i for i, use in enumerate(value) if use)
        if any(bools):
            raise TypeError(f'acmix_stages mixes bools and ints: {value!r}; give {what}')
        if any(not isinstance(i, int) or not 0 <= i < num_stages for i in value):
            raise ValueError(f'acmix_stages must be a subset of 0..{num_stages - 1}, '
                             f'got {value}')
        return value

    @classmethod
    def _arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            if arch not in cls.arch_settings:
                raise ValueError(f'arch {arch!r} is not one of {sorted(cls.arch_settings)} '
                                 '(or give a dict with embed_dims, depths, num_heads)')
            return dict(cls.arch_settings[arch])
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        needed = {'embed_dims', 'depths', 'num_heads'}
        if set(arch) != needed:
            raise ValueError(f'an arch dict needs exactly the keys {sorted(needed)}, got {sorted(arch)}')
        check_int('arch embed_dims', arch['embed_dims'], 1)
        for key in ('depths', 'num_heads'):
            for i, v in enumerate(check_sequence(f'arch {key}', arch[key], 'positive ints')):
                check_int(f'arch {key}[{i}]', v, 1)
        if len(arch['depths']) != len(arch['num_heads']) or not arch['depths']:
            raise ValueError(f'arch depths {arch["depths"]} and num_heads {arch["num_heads"]} must '
                             'be non-empty and of the same length')
        return dict(arch)

    # ------------------------------------------------------------------ init
    def _default_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, ACMixWindowAttention):
                trunc_normal_(m.relative_position_bias_table, std=0.02)
                m.reset_acmix()

    def _reset_acmix(self) -> None:
        for m in self.modules():
            if isinstance(m, ACMixWindowAttention):
                m.reset_acmix()

    def load_pretrained(self, path: str):
        """Load the authors' Swin-ACmix checkpoint (or one in this layout) without running it.

        Returns the :class:`~acmix_mm.checkpoint.LoadReport`. Output norms of stages
        other than the last are not in the authors' file and keep their init.
        """
        last = len(self.depths) - 1

        def converter(state):
            out, report = convert_swin_authors(state, len(self.depths))
            if last not in self.out_indices:
                for key in [k for k in out if k.startswith(f'norm{last}.')]:
                    report.dropped.append((key, 'final norm (last stage not in out_indices)'))
                    del out[key]
            return out, report

        allow = tuple(f'norm{i}.' for i in self.out_indices if i != last)
        return load_backbone_weights(self, path, converter=converter, allow_missing=allow)

    # --------------------------------------------------------------- forward
    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.patch_embed, self.drop_after_pos]
        for i in range(self.frozen_stages):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for m in frozen:
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'SwinACMix':
        """Switch to train/eval mode, keeping frozen stages in eval."""
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) -> per index i in ``out_indices``, (B, C_i, H_i, W_i).

        C_i = embed_dims * 2**i, H_i = ceil(H / (patch_size * 2**i)) (likewise W_i).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'SwinACMix expects a (B, {self.in_channels}, H, W) input, '
                             f'got shape {tuple(x.shape)}')
        x, hw = self.patch_embed(x)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, next_hw, out, out_hw = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                outs.append(out.view(-1, *out_hw, self.num_features[i]).permute(0, 3, 1, 2)
                            .contiguous())
            hw = next_hw
        return tuple(outs)
