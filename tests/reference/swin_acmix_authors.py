"""A spec-literal reference of the authors' Swin-ACmix (section 4 of /work/shared/acmix-spec.md).

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022. Written from the
spec, not from the authors' code: it has their module names and checkpoint keys
(``patch_embed``, ``layers.i.blocks.j...``, ``layers.i.downsample``, ``norm``, ``head``, the
``relative_position_index`` and ``attn_mask`` buffers) and their fixed-resolution behaviour:
224x224 input only, per-block input resolution fixed at construction, and a stage whose map is
no larger than the window uses window = map size and no shift. Tests use it as the source of
"authors' weights and outputs"; it is deliberately simple and slow (no padding, no caching).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous()
    return x.view(-1, ws * ws, C)


def _reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous()
    return x.view(B, H, W, C)


class WindowAttentionACmix(nn.Module):
    """The authors' block attention: shared qkv, window attention + proj, conv branch, mix."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.ws, self.heads = dim, window_size, num_heads
        self.hd = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window_size - 1) ** 2, num_heads) * 0.02)
        index = torch.empty(window_size ** 2, window_size ** 2, dtype=torch.long)
        for i in range(window_size ** 2):
            for j in range(window_size ** 2):
                dy = i // window_size - j // window_size + window_size - 1
                dx = i % window_size - j % window_size + window_size - 1
                index[i, j] = dy * (2 * window_size - 1) + dx
        self.register_buffer('relative_position_index', index)
        self.rate1 = nn.Parameter(torch.tensor([0.5]))
        self.rate2 = nn.Parameter(torch.tensor([0.5]))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Conv2d(3 * num_heads, 9, 1, bias=True)
        self.dep_conv = nn.Conv2d(9 * self.hd, dim, 3, padding=1, groups=self.hd, bias=False)
        shift = torch.zeros(9, 3, 3)
        for t in range(9):
            shift[t, t // 3, t % 3] = 1
        with torch.no_grad():
            self.dep_conv.weight.copy_(shift.repeat(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, H, W, C), already cyclically shifted -> (B, H, W, C), still shifted."""
        B, H, W, C = x.shape
        qkv = self.qkv(x)  # computed once on the whole map
        # convolution branch, literally as the spec lays it out
        f = qkv.reshape(B, H * W, 3 * self.heads, self.hd).permute(0, 2, 1, 3)  # (B, 3h, HW, hd)
        f = self.fc(f)  # (B, 9, HW, hd)
        f = f.permute(0, 3, 1, 2).reshape(B, self.hd * 9, H, W)
        conv = self.dep_conv(f).permute(0, 2, 3, 1)
        # attention branch on windows
        ws, n = self.ws, self.ws * self.ws
        windows = _partition(qkv, ws)
        qkv_w = windows.reshape(-1, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv_w[0] * self.hd ** -0.5, qkv_w[1], qkv_w[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, C)
        out = _reverse(self.proj(out), ws, H, W)
        return self.rate1 * out + self.rate2 * conv


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int) -> None:
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window_size:  # the authors' rule
            window_size, shift_size = min(resolution), 0
        self.ws, self.shift = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttentionACmix(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        if shift_size:
            H, W = resolution
            region = torch.zeros(1, H, W, 1)
            label = 0
            for hs in (slice(0, -window_size), slice(-window_size, -shift_size),
                       slice(-shift_size, None)):
                for wsl in (slice(0, -window_size), slice(-window_size, -shift_size),
                            slice(-shift_size, None)):
                    region[:, hs, wsl, :] = label
                    label += 1
            mw = _partition(region, window_size).squeeze(-1)
            mask = (mw.unsqueeze(1) - mw.unsqueeze(2))
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        else:
            mask = None
        self.register_buffer('attn_mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        x = self.attn(x, self.attn_mask)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), (1, 2))
        x = shortcut + x.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, resolution: Tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, resolution: Tuple[int, int], depth: int, num_heads: int,
                 window_size: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2)
            for j in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2:] == (self.img_size, self.img_size), 'the original takes 224x224 only'
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinACmixAuthors(nn.Module):
    """The authors' Swin-ACmix classifier (eval behaviour; no dropout / drop path)."""

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 img_size: int = 224, patch_size: int = 4, num_classes: int = 1000) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        res = img_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            r = res // 2 ** i
            self.layers.append(BasicLayer(embed_dim * 2 ** i, (r, r), depth, heads, window_size,
                                          downsample=i < len(depths) - 1))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, num_features): final norm, then average over tokens."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.avgpool(x.transpose(1, 2)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
