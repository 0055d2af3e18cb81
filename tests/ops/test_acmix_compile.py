"""torch.compile (inductor on CPU) of ACMix matches eager, forward and backward (~30 s)."""
from __future__ import annotations

import pytest
import torch

from acmix_mm.ops import ACMix


@pytest.mark.parametrize('impl', ['lean'])
def test_compiled_matches_eager(impl):
    torch.manual_seed(0)
    model = ACMix(16, 16, stride=2, attn_impl=impl)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.5)
        model.conv_p.weight.normal_()
    x = torch.randn(2, 16, 9, 10)
    grad_out = torch.randn(2, 16, 5, 5)

    def run(fn):
        inp = x.clone().requires_grad_()
        out = fn(inp)
        params = list(model.parameters())
        grads = torch.autograd.grad(out, [inp] + params, grad_out)
        return [out.detach()] + list(grads)

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, backend='inductor'))
    for name, a, b in zip(['output', 'input'] + [n for n, _ in model.named_parameters()],
                          compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
