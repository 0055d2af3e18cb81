"""Ground truth for tests: the authors' ACMix operator, transcribed from its description.

This is a literal re-statement of the behaviour described in ``shared/acmix-spec.md`` section 1
(Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022), written from
that description, not copied. It keeps the original's limitations on purpose, because tests
use it to check that :class:`acmix_mm.ops.ACMix` reproduces the original *where the original
works*:

- the position map is always float32 (float16/bfloat16/float64 inputs fail in ``conv_p``);
- the output size is computed as ``H // stride`` while the sliding window produces
  ``ceil(H / stride)`` positions (odd sizes at stride > 1 fail in a ``view``);
- keys, values and the position map are reflection-padded (maps of <= 3 px fail);
- ``dep_conv`` has padding 1 whatever ``kernel_conv`` is, and the window ignores ``dilation``
  (only its padding uses it).

The module is self-contained (only torch) and uses the authors' parameter names, so that a
reference ResNet-ACmix can be assembled from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['AuthorsACMix', 'authors_position_map']


def authors_position_map(height: int, width: int, device: torch.device) -> torch.Tensor:
    """The original's position map: (1, 2, H, W) float32, channel 0 = x, channel 1 = y.

    Each coordinate is ``linspace(-1, 1, n)`` over the current map, so its step depends on the
    map's size.
    """
    xs = torch.linspace(-1.0, 1.0, width, dtype=torch.float32, device=device)
    ys = torch.linspace(-1.0, 1.0, height, dtype=torch.float32, device=device)
    loc_x = xs.view(1, width).expand(height, width)
    loc_y = ys.view(height, 1).expand(height, width)
    return torch.stack([loc_x, loc_y], dim=0).unsqueeze(0)


class AuthorsACMix(nn.Module):
    """The authors' ACMix (ResNet variant), a drop-in for a 3x3 conv on (B, C, H, W).

    Parameters (names as in the authors' checkpoints): ``rate1``/``rate2`` mixing scalars,
    ``conv1``/``conv2``/``conv3`` = q/k/v 1x1 convs with bias, ``conv_p`` (2 -> head_dim, bias)
    turning the position map into pe, ``fc`` (3*head -> kernel_conv**2, no bias) and
    ``dep_conv`` (grouped, groups=head_dim, no bias, shift-initialised).
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4,
                 kernel_conv: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.head = head
        self.kernel_att = kernel_att
        self.kernel_conv = kernel_conv
        self.stride = stride
        self.dilation = dilation
        self.head_dim = out_planes // head
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        # The original pads by (dilation*(k-1)+1)//2 but its unfold has no dilation.
        self.padding_att = (dilation * (kernel_att - 1) + 1) // 2
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        self.dep_conv = nn.Conv2d(kernel_conv * kernel_conv * self.head_dim, out_planes,
                                  kernel_size=kernel_conv, bias=False, groups=self.head_dim,
                                  padding=1, stride=stride)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """rate1 = rate2 = 0.5; dep_conv = shift kernels (one-hot at (t // k, t % k))."""
        nn.init.constant_(self.rate1, 0.5)
        nn.init.constant_(self.rate2, 0.5)
        k = self.kernel_conv
        shift = torch.zeros(k * k, k, k)
        for t in range(k * k):
            shift[t, t // k, t % k] = 1.0
        with torch.no_grad():
            self.dep_conv.weight.copy_(shift.unsqueeze(0).repeat(self.out_planes, 1, 1, 1))

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Reflection-pad then unfold the window (no dilation), stride = self.stride."""
        x = F.pad(x, [self.padding_att] * 4, mode='reflect')
        return F.unfold(x, kernel_size=self.kernel_att, padding=0, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        scaling = float(self.head_dim) ** -0.5
        b, c, h, w = q.shape
        h_out, w_out = h // self.stride, w // self.stride
        kk = self.kernel_att * self.kernel_att

        pe = self.conv_p(authors_position_map(h, w, x.device))  # (1, head_dim, H, W)
        q_att = q.view(b * self.head, self.head_dim, h, w) * scaling
        k_att = k.view(b * self.head, self.head_dim, h, w)
        v_att = v.view(b * self.head, self.head_dim, h, w)
        if self.stride > 1:
            q_att = q_att[:, :, ::self.stride, ::self.stride]
            q_pe = pe[:, :, ::self.stride, ::self.stride]
        else:
            q_pe = pe

        unfold_k = self._unfold(k_att).view(b * self.head, self.head_dim, kk, h_out, w_out)
        unfold_rpe = self._unfold(pe).view(1, self.head_dim, kk, h_out, w_out)
        att = (q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1)
        att = att.softmax(dim=1)  # over the kk window positions
        unfold_v = self._unfold(v_att).view(b * self.head, self.head_dim, kk, h_out, w_out)
        out_att = (att.unsqueeze(1) * unfold_v).sum(2).view(b, self.out_planes, h_out, w_out)

        f_all = self.fc(torch.cat([q.view(b, self.head, self.head_dim, h * w),
                                   k.view(b, self.head, self.head_dim, h * w),
                                   v.view(b, self.head, self.head_dim, h * w)], dim=1))
        f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)
        out_conv = self.dep_conv(f_conv)
        return self.rate1 * out_att + self.rate2 * out_conv
