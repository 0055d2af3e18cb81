"""Half precision on inputs of realistic scale and beyond: no overflow, close to float32.

ACMix and both backbones run under ``torch.autocast('cpu', float16 | bfloat16)`` and as
``model.half()`` / ``model.bfloat16()`` models (CPU has half kernels for every op they use), on
a unit-variance input times 1, 30 and 300. Every output and gradient (input and all
parameters) must be finite and close to the float32 result of the same weights:

    ||y_half - y_fp32|| / ||y_fp32|| <= 1e-2 (float16), 6e-2 (bfloat16)

for the outputs and for the gradients of a fixed random projection of the outputs. float16 keeps
11 significant bits (unit roundoff 4.9e-4), bfloat16 8 (3.9e-3); measured here at most 2.7e-3
(float16) and 4e-2 (bfloat16, ACMix at x300, where the logits reach ~1e5 and bfloat16's
rounding of q and k moves them by tens). Measured values: /tmp/readme/numerics.md.

Why it holds for ACMix: its attention (logits, softmax, weighted sum) runs in float32 whatever
the activations' dtype. At x300 the logits of the ACMix layer below exceed float16's 65504,
which the tests show by computing them in float16 (inf), while the layer's output stays finite.

SwinACMix's window attention runs its logits, softmax and weighted sum in float32 for float16
activations (q/k projections below give logits above 65504); bfloat16 has float32's range and
stays in bfloat16.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

from acmix_mm.models.backbones.resnet_acmix import ResNetACMix
from acmix_mm.models.backbones.swin_acmix import ACMixWindowAttention, SwinACMix
from acmix_mm.ops import ACMix

SCALES = (1.0, 30.0, 300.0)
MODES = ('autocast-fp16', 'autocast-bf16', 'model-fp16', 'model-bf16')
# The backbones normalise their input (BN / LayerNorm after the stem): x30 adds nothing to x1, x300.
BACKBONE_SCALES = (1.0, 300.0)
# Outputs of 26 layers in half precision drift more than one layer's (measured at most 7.3e-3
# float16, 4.5e-2 bfloat16 for ResNet; 1.2e-3 / 1.0e-2 for Swin).
BACKBONE_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}
# The default run keeps one float16 and one bfloat16 case per backbone at x300; the rest is slow.
BACKBONE_CASES = pytest.mark.parametrize('scale, mode', [
    pytest.param(scale, mode, marks=() if scale == 300.0 and mode in ('autocast-fp16', 'model-bf16')
                 else pytest.mark.slow)
    for scale in BACKBONE_SCALES for mode in MODES])
TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}
FP16_MAX = torch.finfo(torch.float16).max  # 65504
SWIN_SMALL = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _dtype(mode: str) -> torch.dtype:
    return torch.float16 if mode.endswith('fp16') else torch.bfloat16


def _outputs(y) -> List[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _run(model: nn.Module, x: torch.Tensor, mode: str) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
    """Forward + backward of a copy of ``model`` in ``mode`` ('fp32' or one of MODES).

    Returns:
        (outputs as float32, {'input' or parameter name: gradient as float32}). The loss is the
        mean of a fixed (seeded) random projection of every output, the same in every mode: a
        mean, like a real loss, so each output element gets a gradient of ~1/numel.
    """
    model = copy.deepcopy(model)
    x = x.clone()
    if mode.startswith('model-'):
        model = model.to(_dtype(mode))
        x = x.to(_dtype(mode))
    x.requires_grad_(True)
    if mode.startswith('autocast-'):
        with torch.autocast('cpu', dtype=_dtype(mode)):
            ys = _outputs(model(x))
    else:
        ys = _outputs(model(x))
    generator = torch.Generator().manual_seed(0)
    loss = sum((y.float() * torch.randn(y.shape, generator=generator)).mean() for y in ys)
    loss.backward()
    grads = {'input': x.grad.float()}
    grads.update((n, p.grad.float()) for n, p in model.named_parameters() if p.grad is not None)
    return [y.detach().float() for y in ys], grads


def _rel(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together."""
    diff = torch.cat([(x - y).flatten() for x, y in zip(a, b)])
    ref = torch.cat([y.flatten() for y in b])
    return float(diff.norm() / ref.norm())


def _check(model: nn.Module, x: torch.Tensor, mode: str,
           compare: Optional[Callable[[str], bool]] = None,
           tol: Optional[Dict[torch.dtype, float]] = None) -> Tuple[float, float]:
    """Assert finite outputs/gradients in ``mode`` and closeness to float32 (TOL).

    Args:
        compare: which gradients (by name: 'input' or a parameter) are compared with float32;
            default all. Every gradient must be finite either way.
        tol: relative tolerance per half dtype (default TOL).

    Returns:
        (output error, error of the compared gradients), relative, see :func:`_rel`.
    """
    ref_out, ref_grad = _run(model, x, 'fp32')
    out, grad = _run(model, x, mode)
    assert all(torch.isfinite(y).all() for y in out), f'{mode}: non-finite output'
    bad = [n for n, g in grad.items() if not torch.isfinite(g).all()]
    assert not bad, f'{mode}: non-finite gradients of {bad}'
    assert grad.keys() == ref_grad.keys()
    names = [n for n in grad if compare is None or compare(n)]
    out_err = _rel(out, ref_out)
    grad_err = _rel([grad[n] for n in names], [ref_grad[n] for n in names]) if names else 0.0
    tol = (tol or TOL)[_dtype(mode)]
    assert out_err <= tol, f'{mode}: output error {out_err:.2e} > {tol}'
    assert grad_err <= tol, f'{mode}: gradient error {grad_err:.2e} > {tol} ({names})'
    return out_err, grad_err


def _acmix() -> ACMix:
    torch.manual_seed(0)
    return ACMix(64, 64, kernel_att=7, head=4, kernel_conv=3, stride=1)


def _not_through_the_softmax(name: str) -> bool:
    return name.split('.')[0] not in ('input', 'conv1', 'conv2', 'conv_p')


def _unit_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- ACMix
@pytest.mark.parametrize('scale, mode', [
    # The default run: every mode at x300, autocast at x1 and x30; half models there are slow.
    pytest.param(scale, mode, marks=() if scale == 300.0 or mode.startswith('autocast') else pytest.mark.slow)
    for scale in SCALES for mode in MODES])
def test_acmix_half_precision_at_scale(scale, mode):
    model = _acmix()
    x = _unit_input(2, 64, 16, 16) * scale
    # From x30 on the logits reach 1e3-1e5 and the softmax is nearly one-hot: the gradients that
    # pass through its derivative (q and k: conv1, conv2, conv_p, the input) come from the few
    # near-tied logits, which a 1e-3 relative change of q or k reorders (ill-conditioned in any
    # precision). Those must be finite; the others (v, rates, conv branch) close to float32.
    _check(model, x, mode, None if scale == 1.0 else _not_through_the_softmax)
    if mode.startswith('model-'):
        out = model.to(_dtype(mode))(x.to(_dtype(mode)))
        assert out.dtype == _dtype(mode)


def test_acmix_logits_at_x300_would_overflow_in_float16():
    # What the float32 attention avoids: the same layer's logits computed in float16.
    model = _acmix().half()
    x = (_unit_input(2, 64, 16, 16) * 300).half()
    with torch.no_grad():
        q = model.conv1(x).view(2, 4, 16, 16 * 16) * model.head_dim ** -0.5
        k = model.conv2(x).view(2, 4, 16, 16 * 16)
        # Each query against the keys of its own pixel and its left neighbour (inside its window).
        logits = torch.cat([(q * k).sum(2), (q[..., 1:] * k[..., :-1]).sum(2)], -1)
        assert torch.isinf(logits).any()
        assert float((q.float() * k.float()).sum(2).abs().max()) > FP16_MAX
        out = model(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize('mode', MODES)
def test_acmix_large_qk_weights(mode):
    # q/k projections x300: q.k reaches ~1e5 on a unit input (float16's max: 65504).
    model = _acmix()
    with torch.no_grad():
        for conv in (model.conv1, model.conv2):
            conv.weight.mul_(300.0)
    x = _unit_input(2, 64, 16, 16)
    with torch.no_grad():
        q = model.conv1(x) * model.head_dim ** -0.5
        assert float((q * model.conv2(x)).view(2, 4, 16, -1).sum(2).abs().max()) > FP16_MAX
    _check(model, x, mode, _not_through_the_softmax)


# ----------------------------------------------------------------------------- backbones
def _resnet(residual_gain: float = 0.2) -> ResNetACMix:
    """Slim ResNet-ACMix-26 at its init, except each block's last norm weight = residual_gain.

    At init the last norms are zero (every block an identity): the ACMix layers would neither
    change the output nor get a gradient. A small gain lets them do both while the 8 blocks stay
    close to identities, as in a trained network (gain 1 makes a random 26-layer network chaotic:
    its float32 output itself moves by 10 % under float16 rounding of its input).
    """
    torch.manual_seed(0)
    model = ResNetACMix(depth=26, base_channels=16)
    model.init_weights()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith('.bn3'):
                module.weight.fill_(residual_gain)
    return model


@BACKBONE_CASES
def test_resnet_acmix_half_precision_at_scale(scale, mode):
    model = _resnet().train()  # batch statistics, as in training
    x = _unit_input(2, 3, 32, 32) * scale
    # Gradients: finite, not compared. Those of a random ResNet with train-mode BN under this
    # loss are dominated by rounding in any half precision, with 3x3 convs in place of ACMix
    # just as much (relative error ~0.3-1.2 for both; see /tmp/readme/numerics.md).
    _check(model, x, mode, compare=lambda name: False, tol=BACKBONE_TOL)


def _swin() -> SwinACMix:
    torch.manual_seed(0)
    model = SwinACMix(SWIN_SMALL, drop_path_rate=0.0)  # no random drops: runs are comparable
    model.init_weights()
    return model.train()


@BACKBONE_CASES
def test_swin_acmix_half_precision_at_scale(scale, mode):
    # 32x32: stage-1 map 8x8, padded to 14x14 for 7x7 windows, shifted every second block.
    _check(_swin(), _unit_input(2, 3, 32, 32) * scale, mode)


def _swin_large_logits(c: float = 200.0) -> SwinACMix:
    """Every block's q and k projections = c * identity: logits ~ c^2 |x|^2 / sqrt(d) >> 65504."""
    model = _swin()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ACMixWindowAttention):
                dim = module.dim
                module.qkv.weight[:dim] = c * torch.eye(dim)
                module.qkv.weight[dim:2 * dim] = c * torch.eye(dim)
                module.qkv.bias[:2 * dim] = 0.0
    return model


def _max_swin_logit(model: SwinACMix, x: torch.Tensor) -> float:
    """The largest |logit| of any window attention, computed in float32."""
    found: List[float] = []
    original: Callable = ACMixWindowAttention._attention

    def spy(self, qkv, wh, ww, mask):
        from acmix_mm.models.backbones.swin_acmix import window_partition
        n = wh * ww
        windows = window_partition(qkv.float(), wh, ww)
        q, k, _ = windows.view(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        found.append(float(((q * self.scale) @ k.transpose(-2, -1)).abs().max()))
        return original(self, qkv, wh, ww, mask)

    ACMixWindowAttention._attention = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        ACMixWindowAttention._attention = original
    return max(found)



@pytest.mark.parametrize('mode', [
    'autocast-fp16',
    'autocast-bf16',
    pytest.param('model-fp16', marks=pytest.mark.slow),
    pytest.param('model-bf16', marks=pytest.mark.slow),
])
def test_swin_acmix_logits_beyond_float16_range(mode):
    model = _swin_large_logits()
    x = _unit_input(2, 3, 32, 32)
    assert _max_swin_logit(model, x) > 4 * FP16_MAX
    _check(model, x, mode)
