"""torch.compile (inductor on CPU) of ACMix matches eager, forward and backward (~30-60 s).

The second input size makes dynamo recompile with dynamic shapes, as it does for detectors
fed images of varying size.
"""
from __future__ import annotations

import torch

import pytest

from acmix_mm.ops import ACMix, cpp_extension


# 'lean': an autograd.Function traced by dynamo; 'cpp': the torch custom op (fake + autograd
# registrations), which 'auto' picks under compile once the extension is loaded.
@pytest.mark.parametrize('impl', ['lean', 'cpp'])
def test_compiled_matches_eager_on_two_sizes(impl):
    if impl == 'cpp':
        assert cpp_extension.load_extension() is not None, cpp_extension.extension_error()
    torch.manual_seed(0)
    model = ACMix(16, 16, stride=2, attn_impl=impl)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.5)
        model.conv_p.weight.normal_()
    names = ['output', 'input'] + [n for n, _ in model.named_parameters()]

    def run(fn, x, grad_out):
        inp = x.clone().requires_grad_()
        out = fn(inp)
        grads = torch.autograd.grad(out, [inp] + list(model.parameters()), grad_out)
        return [out.detach()] + list(grads)

    torch._dynamo.reset()
    compiled = torch.compile(model)
    for size in ((9, 10), (12, 7)):
        x = torch.randn(2, 16, *size)
        grad_out = torch.randn(2, 16, (size[0] + 1) // 2, (size[1] + 1) // 2)
        for name, a, b in zip(names, run(compiled, x, grad_out), run(model, x, grad_out)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f'{size}: {name}')
