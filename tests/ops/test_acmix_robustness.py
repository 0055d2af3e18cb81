"""ACMix where the authors' code fails: odd/tiny maps, dtypes, kernel sizes, dilation, bad args."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acmix_mm.ops import ACMix


def _model(in_ch=8, out_ch=8, seed=0, **kwargs) -> ACMix:
    """An ACMix away from its init (random rates, fc, dep_conv, position weights)."""
    torch.manual_seed(seed)
    model = ACMix(in_ch, out_ch, **kwargs)
    with torch.no_grad():
        model.rate1.fill_(0.8)
        model.rate2.fill_(0.3)
        model.fc.weight.normal_(0, 0.5)
        model.dep_conv.weight.normal_(0, 0.3)
        model.conv_p.weight.normal_()
        model.conv_p.bias.normal_()
    return model


def _definition(model: ACMix, x: torch.Tensor) -> torch.Tensor:
    """ACMix written out from its documented semantics, in float64 with numpy padding.

    Attention: explicit pe = conv_p(coords) with bias and the logit q_i . (k_j + pe_i - pe_j),
    windows read from the maps extended by numpy's repeated reflection, centred on (y*s, x*s)
    with offsets spaced by the dilation. Convolution: fc, then dep_conv as an ordinary conv.
    """
    x = x.double()
    p = {k: v.double() for k, v in model.state_dict().items()}
    s, d, ka, heads = model.stride, model.dilation, model.kernel_att, model.head
    dim, pad = model.head_dim, model.padding_att
    b, _, h, w = x.shape
    q = F.conv2d(x, p['conv1.weight'], p['conv1.bias']) * dim ** -0.5
    k = F.conv2d(x, p['conv2.weight'], p['conv2.bias'])
    v = F.conv2d(x, p['conv3.weight'], p['conv3.bias'])
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing='ij')
    pe = F.conv2d(torch.stack([xs, ys])[None], p['conv_p.weight'], p['conv_p.bias'])[0]

    def numpy_pad(t):  # (..., H, W) -> repeated reflection on the last two axes
        widths = [(0, 0)] * (t.dim() - 2) + [(pad, pad), (pad, pad)]
        return torch.from_numpy(np.pad(t.numpy(), widths, mode='reflect'))

    k_pad, v_pad, pe_pad = numpy_pad(k), numpy_pad(v), numpy_pad(pe)
    h_out, w_out = math.ceil(h / s), math.ceil(w / s)
    out_att = torch.zeros(b, model.out_channels, h_out, w_out, dtype=torch.float64)
    for hd in range(heads):
        ch = slice(hd * dim, (hd + 1) * dim)
        for yo in range(h_out):
            for xo in range(w_out):
                qi, pei = q[:, ch, yo * s, xo * s], pe[:, yo * s, xo * s]
                logits, vals = [], []
                for ty in range(ka):
                    for tx in range(ka):
                        py, px = yo * s + ty * d, xo * s + tx * d
                        kj = k_pad[:, ch, py, px] + pei - pe_pad[:, py, px]
                        logits.append((qi * kj).sum(1))
                        vals.append(v_pad[:, ch, py, px])
                attn = torch.stack(logits, 1).softmax(1)
                out_att[:, ch, yo, xo] = sum(attn[:, t:t + 1] * vals[t] for t in range(len(vals)))

    kc = model.kernel_conv
    stacked = torch.cat([t.view(b, heads, dim, h * w) for t in (q * dim ** 0.5, k, v)], 1)
    f_all = torch.einsum('tj,bjdn->btdn', p['fc.weight'][:, :, 0, 0], stacked)
    f_conv = f_all.permute(0, 2, 1, 3).reshape(b, dim * kc * kc, h, w)
    out_conv = F.conv2d(f_conv, p['dep_conv.weight'], stride=s, padding=d * (kc // 2),
                        dilation=d, groups=dim)
    return p['rate1'] * out_att + p['rate2'] * out_conv


@pytest.mark.parametrize('impl', ['lean', 'unfold', 'cpp'])
@pytest.mark.parametrize('size,stride,dilation,kernel_conv', [
    ((1, 1), 1, 1, 3), ((2, 3), 1, 1, 3), ((3, 3), 2, 1, 3), ((1, 2), 2, 1, 3),
    ((5, 7), 2, 1, 3), ((7, 4), 2, 1, 5), ((6, 5), 1, 2, 3), ((5, 6), 2, 2, 5),
])
def test_matches_documented_semantics(impl, size, stride, dilation, kernel_conv):
    model = _model(stride=stride, dilation=dilation, kernel_conv=kernel_conv, attn_impl=impl)
    x = torch.randn(2, 8, *size)
    out = model(x)
    assert out.shape == (2, 8, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    torch.testing.assert_close(out.double(), _definition(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [(15, 15), (9, 6), (3, 3), (2, 2), (1, 1), (1, 5)])
def test_stride_two_is_stride_one_subsampled(size):
    # Same parameters: queries at [::2, ::2] centred on their full-resolution position.
    one, two = _model(stride=1), _model(stride=2)
    two.load_state_dict(one.state_dict())
    x = torch.randn(1, 8, *size)
    out = two(x)
    assert out.shape[-2:] == (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    torch.testing.assert_close(out, one(x)[..., ::2, ::2], rtol=1e-5, atol=1e-6)


def test_one_pixel_map_attends_to_itself():
    model = _model()
    with torch.no_grad():
        model.rate1.fill_(1.0)
        model.rate2.fill_(0.0)
    x = torch.randn(3, 8, 1, 1)
    torch.testing.assert_close(model(x), model.conv3(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', ['lean', 'unfold', 'cpp'])
def test_gradcheck_whole_operator_float64(impl):
    model = _model(in_ch=4, out_ch=4, head=2, kernel_att=3, stride=2, attn_impl=impl).double()
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())

    def fn(inp, *weights):
        return torch.func.functional_call(model, dict(zip(
            [n for n, _ in model.named_parameters()], weights)), (inp,))

    # fast_mode checks random projections of the Jacobian: ~500 inputs would cost minutes.
    assert torch.autograd.gradcheck(fn, [x] + [t.detach().requires_grad_() for t in params],
                                    fast_mode=True)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_model_dtype(dtype):
    model = _model(in_ch=16, out_ch=16, stride=2)
    x = torch.randn(2, 16, 9, 7)
    expected = model(x)
    out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast(dtype):
    model = _model(in_ch=16, out_ch=16)
    x = torch.randn(2, 16, 6, 5)
    expected = model(x)
    with torch.autocast('cpu', dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_fp16_logits_do_not_overflow():
    # With all-ones q/k projections, q . k reaches ~4.6e5, beyond float16's 65504: computed in
    # float16 the logits are inf (the softmax then gives NaN). The branch runs in float32.
    model = _model(in_ch=16, out_ch=16)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    model = model.half()
    x = 30.0 + torch.rand(1, 16, 6, 6, dtype=torch.float16)
    with torch.no_grad():
        q = model.conv1(x) * model.head_dim ** -0.5
        logits_fp16 = (q * model.conv2(x)).view(4, -1, 36).sum(1)
        out = model(x)
    assert torch.isinf(logits_fp16).any()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_float64():
    model = _model(stride=2).double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    out = model(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _definition(model, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('kernel_conv', [1, 3, 5])
def test_shift_init(kernel_conv):
    model = ACMix(8, 8, kernel_conv=kernel_conv, head=2)
    k = kernel_conv
    weight = model.dep_conv.weight
    assert weight.shape == (8, k * k, k, k)
    for t in range(k * k):
        one_hot = torch.zeros(k, k)
        one_hot[t // k, t % k] = 1
        assert torch.equal(weight[:, t], one_hot.expand(8, k, k))
    assert model.rate1.item() == model.rate2.item() == 0.5


@pytest.mark.parametrize('kernel_conv,dilation', [(3, 1), (5, 2)])
def test_conv_branch_at_init_shifts_fc_outputs(kernel_conv, dilation):
    model = ACMix(8, 8, head=2, kernel_conv=kernel_conv, dilation=dilation)
    with torch.no_grad():
        model.rate1.fill_(0.0)  # the output is then the convolution branch alone
        model.rate2.fill_(1.0)
        model.fc.weight.normal_()
    x = torch.randn(1, 8, 6, 7)
    heads, dim, k = model.head, model.head_dim, kernel_conv
    stacked = torch.cat([conv(x).view(1, heads, dim, 42)
                         for conv in (model.conv1, model.conv2, model.conv3)], dim=1)
    f_all = model.fc(stacked).view(1, k * k, dim, 6, 7)
    pad = dilation * (k // 2)
    padded = F.pad(f_all, [pad] * 4)
    expected = torch.zeros(1, dim, 6, 7)
    for t in range(k * k):  # fc output t shifted by kernel offset t and summed
        dy, dx = (t // k) * dilation, (t % k) * dilation
        expected += padded[:, t, :, dy:dy + 6, dx:dx + 7]
    # Output channel o reads group (head_dim index) o // head.
    torch.testing.assert_close(model(x), expected.repeat_interleave(heads, 1),
                               rtol=1e-5, atol=1e-5)


def test_reset_parameters_restores_shift_after_kaiming():
    model = ACMix(8, 8)
    torch.nn.init.kaiming_normal_(model.dep_conv.weight)
    model.reset_parameters()
    assert torch.equal(model.dep_conv.weight, ACMix(8, 8).dep_conv.weight)


@pytest.mark.parametrize('kwargs,match', [
    (dict(out_channels=10, head=4), 'out_channels .10. must be divisible by head .4.'),
    (dict(kernel_conv=4), 'kernel_conv must be odd'),
    (dict(kernel_att=6), 'kernel_att must be odd'),
    (dict(stride=0), 'stride must be a positive int, got 0'),
    (dict(dilation=-1), 'dilation must be a positive int, got -1'),
    (dict(head=0), 'head must be a positive int'),
    (dict(in_channels=0), 'in_channels must be a positive int'),
    (dict(attn_impl='flash'), "attn_impl must be one of .*'flash'"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(in_channels=8, out_channels=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ACMix(**args)


def test_non_int_argument_raises_type_error():
    with pytest.raises(TypeError, match='stride must be an int'):
        ACMix(8, 8, stride=1.5)


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match=r'expects \(B, 8, H, W\)'):
        ACMix(8, 8)(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize('impl', ['lean', 'unfold', 'cpp'])
def test_channels_last_input(impl):
    model = _model(stride=2, attn_impl=impl)
    x = torch.randn(2, 8, 9, 8)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = model(x_cl)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert x_cl.grad.shape == x.shape and torch.isfinite(x_cl.grad).all()
