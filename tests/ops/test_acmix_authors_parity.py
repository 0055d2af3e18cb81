"""ACMix reproduces the authors' operator (outputs, gradients, state_dict) where theirs runs."""
from __future__ import annotations

import pytest
import torch

from acmix_mm.ops import ACMix
from tests.reference.acmix_authors import AuthorsACMix

# The spec's table for in = out = 64, head = 4.
EXPECTED_SHAPES = {
    'rate1': (1,), 'rate2': (1,),
    'conv1.weight': (64, 64, 1, 1), 'conv1.bias': (64,),
    'conv2.weight': (64, 64, 1, 1), 'conv2.bias': (64,),
    'conv3.weight': (64, 64, 1, 1), 'conv3.bias': (64,),
    'conv_p.weight': (16, 2, 1, 1), 'conv_p.bias': (16,),
    'fc.weight': (9, 12, 1, 1),
    'dep_conv.weight': (64, 9, 3, 3),
}


def _randomised_authors(in_ch: int, out_ch: int, stride: int, head: int = 4) -> AuthorsACMix:
    """An authors' module moved away from its init, so every parameter matters."""
    torch.manual_seed(0)
    ref = AuthorsACMix(in_ch, out_ch, kernel_att=7, head=head, kernel_conv=3, stride=stride)
    with torch.no_grad():
        ref.rate1.fill_(0.7)
        ref.rate2.fill_(0.4)
        ref.conv_p.weight.normal_()
        ref.conv_p.bias.normal_()
        ref.fc.weight.normal_(0, 0.5)
        ref.dep_conv.weight.add_(0.2 * torch.randn_like(ref.dep_conv.weight))
    return ref


def _assert_close(actual: torch.Tensor | None, expected: torch.Tensor, name: str) -> None:
    if actual is None:  # a parameter autograd did not reach has a zero gradient
        actual = torch.zeros_like(expected)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_state_dict_matches_authors_table():
    model = ACMix(64, 64, kernel_att=7, head=4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == EXPECTED_SHAPES
    assert sum(p.numel() for p in model.parameters()) == 17_822
    authors = AuthorsACMix(64, 64)
    assert {k: tuple(v.shape) for k, v in authors.state_dict().items()} == EXPECTED_SHAPES


def test_authors_state_dict_loads_strictly():
    ref = _randomised_authors(64, 64, stride=1)
    model = ACMix(64, 64)
    result = model.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize('impl', ['unfold', 'lean', 'cpp'])
@pytest.mark.parametrize('stride,size,channels', [
    (1, (12, 10), (16, 32)),
    (2, (12, 16), (32, 32)),
    (1, (9, 7), (16, 16)),  # odd sizes are fine for the authors at stride 1
    (2, (8, 8), (24, 16)),
])
def test_outputs_and_gradients_match_authors(impl, stride, size, channels):
    in_ch, out_ch = channels
    ref = _randomised_authors(in_ch, out_ch, stride)
    model = ACMix(in_ch, out_ch, stride=stride, attn_impl=impl)
    model.load_state_dict(ref.state_dict(), strict=True)

    torch.manual_seed(1)
    x = torch.randn(2, in_ch, *size, requires_grad=True)
    expected = ref(x)
    actual = model(x)
    assert actual.shape == expected.shape == (2, out_ch, size[0] // stride, size[1] // stride)
    _assert_close(actual, expected, 'output')

    grad_out = torch.randn_like(expected)
    names = ['input'] + [n for n, _ in ref.named_parameters()]
    ref_grads = torch.autograd.grad(expected, [x] + list(ref.parameters()), grad_out)
    our_params = dict(model.named_parameters())
    our_grads = torch.autograd.grad(actual, [x] + [our_params[n] for n in names[1:]], grad_out,
                                    allow_unused=True)
    for name, ours, theirs in zip(names, our_grads, ref_grads):
        _assert_close(ours, theirs, name)


def test_conv_p_bias_gradient_is_zero_in_both():
    ref = _randomised_authors(16, 16, stride=1)
    model = ACMix(16, 16)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 8, 8)
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    # The bias cancels in pe_i - pe_j: the authors' gradient is zero up to rounding, ours exactly.
    assert ref.conv_p.bias.grad.abs().max() < 1e-4 * ref.conv_p.weight.grad.abs().max()
    assert torch.count_nonzero(model.conv_p.bias.grad) == 0
    assert model.conv_p.weight.grad.abs().max() > 0
