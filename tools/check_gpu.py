#!/usr/bin/env python
"""One-shot CUDA check of the Triton local-attention kernels: exactness, speed, half precision.

Sections (each prints a markdown table):

1. exactness: :func:`triton_local_attention` against :func:`unfold_local_attention` on
   several geometries (kernel 3/5/7, stride 1/2, dilation 1/2, odd sizes, 1-3 px maps, ACMix's
   strided views, float32 and float64): max abs error of the output and of the gradients of
   q, k, v, q_pos, and whether two backward passes are bitwise equal (the backward gathers:
   no atomics);
2. speed: forward+backward median time and peak memory at ``--shape`` (default 1,64,200,336)
   of the attention alone (triton / lean / unfold on ACMix-shaped operands: head 4,
   head_dim C/4) and of whole layers (ACMix with attn_impl triton / lean / unfold, and the
   3x3 conv ACMix replaces);
3. half precision: ACMix under ``torch.autocast`` float16 / bfloat16 with large inputs (whose
   logits overflow float16's 65504 if computed in half), and triton_local_attention called
   directly on half inputs: outputs and gradients finite, relative error to float32.

Exits 1 if any check fails. Takes well under 3 minutes on an H100 (most of it Triton's
compilation of the kernels' variants).

``--interpret`` runs the same sections on CPU with Triton's interpreter (numpy) on tiny
shapes: a smoke test of this script where there is no GPU (timings then mean nothing).

    python tools/check_gpu.py                      # on a CUDA machine
    python tools/check_gpu.py --interpret          # anywhere: ~1 min of CPU time
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Importing acmix_mm does not import triton, so --interpret can still switch it to the interpreter.
from acmix_mm.utils.cli import positive_int


def _shape(text: str) -> Tuple[int, int, int, int]:
    try:
        values = tuple(int(p) for p in text.split(','))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1 or values[1] % 4:
        raise argparse.ArgumentTypeError(
            f'shape must be four positive ints B,C,H,W with C divisible by 4 (ACMix uses 4 '
            f'heads), e.g. 1,64,200,336; got {text!r}')
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--interpret', action='store_true',
                        help='run on CPU under TRITON_INTERPRET=1 with tiny shapes (no GPU)')
    parser.add_argument('--shape', type=_shape, default=None,
                        help='B,C,H,W for the timings (default 1,64,200,336; 1,4,4,5 with '
                             '--interpret)')
    parser.add_argument('--iters', type=positive_int, default=None,
                        help='timed iterations, median reported (default 10; 1 with --interpret)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interpret:
        # Triton decides between compiler and interpreter when the kernels are defined, i.e.
        # at import: this must happen before anything imports triton.
        if 'triton' in sys.modules and os.environ.get('TRITON_INTERPRET') != '1':
            sys.exit('check_gpu: --interpret must be set before triton is imported')
        os.environ['TRITON_INTERPRET'] = '1'
    import torch

    from acmix_mm.ops.triton_local_attention import triton_available

    if not triton_available():
        sys.exit('check_gpu: triton is not usable here: '
                 + ('it is not installed (pip install triton)' if _no_triton() else
                    'no CUDA device; use --interpret for the CPU smoke test'))
    device = torch.device('cpu' if args.interpret else 'cuda')
    shape = args.shape or ((1, 4, 4, 5) if args.interpret else (1, 64, 200, 336))
    iters = args.iters or (1 if args.interpret else 10)
    torch.backends.cuda.matmul.allow_tf32 = False  # no matmuls in the kernels; be explicit
    torch.backends.cudnn.allow_tf32 = False
    header = (f'torch {torch.__version__}, triton {_triton_version()}, device '
              f'{torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}'
              f'{" (TRITON_INTERPRET=1)" if args.interpret else ""}')
    print(f'# check_gpu: {header}\n')
    start = time.perf_counter()
    ok = check_exactness(device, args.interpret)
    ok = check_speed(device, shape, iters) and ok
    ok = check_half(device, args.interpret) and ok
    print(f'\ntotal {time.perf_counter() - start:.1f} s: {"ALL PASS" if ok else "FAILURES"}')
    return 0 if ok else 1


def _no_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False


def _triton_version() -> str:
    import triton
    return triton.__version__


# ---------------------------------------------------------------------------------------------
# 1. exactness

# (leading dims, D, Dv, H, W, kernel, dilation, stride, dtype, layout)
GPU_CASES = [
    ((2, 4), 16, 16, 23, 37, 7, 1, 1, 'float32', 'contiguous'),
    ((2, 4), 16, 16, 23, 37, 7, 1, 2, 'float32', 'acmix'),
    ((1, 3), 24, 8, 17, 9, 3, 2, 1, 'float32', 'contiguous'),
    ((1, 2), 32, 32, 15, 15, 5, 2, 2, 'float32', 'contiguous'),
    ((3,), 8, 8, 1, 1, 7, 1, 1, 'float32', 'contiguous'),
    ((2, 2), 8, 4, 2, 3, 7, 1, 1, 'float32', 'contiguous'),
    ((2, 2, 2), 8, 8, 3, 3, 7, 2, 2, 'float32', 'contiguous'),
    ((2, 4), 64, 64, 14, 20, 7, 1, 1, 'float32', 'acmix'),
    ((1, 4), 128, 128, 7, 9, 7, 1, 1, 'float32', 'contiguous'),
    ((2, 4), 16, 16, 12, 13, 7, 1, 2, 'float64', 'acmix'),
]
INTERPRET_CASES = [
    ((1, 2), 4, 4, 5, 6, 7, 1, 1, 'float32', 'contiguous'),
    ((2, 2), 4, 4, 5, 7, 3, 2, 2, 'float32', 'acmix'),
    ((1,), 3, 2, 1, 2, 7, 1, 1, 'float64', 'contiguous'),
]
TOLERANCE = {'float32': 2e-5, 'float64': 1e-11}


def make_operands(lead: Sequence[int], d: int, dv: int, h: int, w: int, stride: int,
                  dtype, device, layout: str = 'contiguous', seed: int = 0, amplitude: float = 1.0
                  ) -> list:
    """q, k, v, q_pos, coord_x, coord_y as unfold_local_attention takes them.

    ``layout='acmix'``: q, k, v are permuted views of one (B, D, 3, head, H, W) tensor and q
    is strided, as ACMix passes them (needs two leading dims and D == Dv).
    """
    import torch
    gen = torch.Generator().manual_seed(seed)
    h_out, w_out = -(-h // stride), -(-w // stride)
    if layout == 'acmix':
        qkv = amplitude * torch.randn(lead[0], d, 3, lead[1], h, w, generator=gen)
        q, k, v = qkv.to(device=device, dtype=dtype).permute(2, 0, 3, 1, 4, 5).unbind(0)
        q = q[..., ::stride, ::stride]
    else:
        q, k, v = (amplitude * torch.randn(*lead, c, *hw, generator=gen).to(device, dtype)
                   for c, hw in ((d, (h_out, w_out)), (d, (h, w)), (dv, (h, w))))
    q_pos = torch.randn(*lead, 2, h_out, w_out, generator=gen).to(device, dtype)
    coord_x = torch.linspace(-1.0, 1.0, w, dtype=dtype, device=device)
    coord_y = torch.linspace(-1.0, 1.0, h, dtype=dtype, device=device)
    return [q, k, v, q_pos, coord_x, coord_y]


def check_exactness(device, interpret: bool) -> bool:
    import torch

    from acmix_mm.ops.local_attention import unfold_local_attention
    from acmix_mm.ops.triton_local_attention import triton_local_attention
    print('## 1. triton vs unfold: max abs error\n')
    print('| lead | D | Dv | H x W | k | dil | stride | dtype | layout | out | dq | dk | dv '
          '| dq_pos | deterministic | ok |')
    print('|---|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|')
    all_ok = True
    for case in (INTERPRET_CASES if interpret else GPU_CASES):
        lead, d, dv, h, w, kernel, dil, stride, dtype_name, layout = case
        dtype = getattr(torch, dtype_name)
        ops = make_operands(lead, d, dv, h, w, stride, dtype, device, layout)
        ins = [x.detach().requires_grad_(True) for x in ops[:4]] + ops[4:]
        scale = d ** -0.5
        ref = unfold_local_attention(*ins, kernel, dil, stride, scale)
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(
            device, dtype)
        ref_grads = torch.autograd.grad(ref, ins[:4], grad_out)
        out = triton_local_attention(*ins, kernel, dil, stride, scale)
        grads = torch.autograd.grad(out, ins[:4], grad_out)
        grads2 = torch.autograd.grad(triton_local_attention(*ins, kernel, dil, stride, scale),
                                     ins[:4], grad_out)
        errors = [(out - ref).abs().max().item()] + [
            (g - r).abs().max().item() for g, r in zip(grads, ref_grads)]
        deterministic = all(torch.equal(a, b) for a, b in zip(grads, grads2))
        ok = max(errors) <= TOLERANCE[dtype_name] and deterministic and all(
            g.shape == r.shape for g, r in zip(grads, ref_grads))
        all_ok &= ok
        print(f'| {lead} | {d} | {dv} | {h}x{w} | {kernel} | {dil} | {stride} | {dtype_name} | '
              f'{layout} | ' + ' | '.join(f'{e:.1e}' for e in errors)
              + f' | {deterministic} | {"PASS" if ok else "FAIL"} |')
    print()
    return all_ok


# ---------------------------------------------------------------------------------------------
# 2. speed

def _route_triton_in_acmix() -> None:
    """Let ACMix(attn_impl='triton') run even where the operator has no 'triton' choice yet.

    Newer acmix_mm versions accept attn_impl='triton' directly; for older ones this wraps the
    operator module's local_attention so that impl='triton' reaches the Triton kernels.
    """
    import acmix_mm.ops.acmix as acmix_module
    from acmix_mm.ops.triton_local_attention import triton_local_attention
    original = acmix_module.local_attention
    if getattr(original, '_routes_triton', False):
        return

    def routed(*args, impl: str = 'lean', **kwargs):
        if impl == 'triton':
            return triton_local_attention(*args, **kwargs)
        return original(*args, impl=impl, **kwargs)

    routed._routes_triton = True  # type: ignore[attr-defined]
    acmix_module.local_attention = routed


def build_acmix(channels: int, impl: str):
    """ACMix(channels, channels) with the given attention implementation."""
    from acmix_mm.ops import ACMix
    try:
        return ACMix(channels, channels, attn_impl=impl)
    except ValueError:
        if impl != 'triton':
            raise
    _route_triton_in_acmix()
    module = ACMix(channels, channels, attn_impl='lean')
    module.attn_impl = 'triton'
    return module


def _time(step: Callable[[], None], device, iters: int) -> Tuple[float, float]:
    """(median seconds, peak MB above the starting level; CUDA only, else nan)."""
    import torch
    # Warm-up (compiles the kernels); none on CPU, where this is the interpreter's smoke test.
    for _ in range(2 if device.type == 'cuda' else 0):
        step()
    peak = float('nan')
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times = []
    for _ in range(iters):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def check_speed(device, shape: Tuple[int, int, int, int], iters: int) -> bool:
    import torch
    from torch import nn

    from acmix_mm.ops.lean_attention import lean_local_attention
    from acmix_mm.ops.local_attention import unfold_local_attention
    from acmix_mm.ops.triton_local_attention import triton_local_attention
    b, c, h, w = shape
    print(f'## 2. forward+backward at B,C,H,W = {b},{c},{h},{w} (median of {iters})\n')
    print('| what | impl | fwd+bwd (ms) | peak (MB) | vs conv3x3 |')
    print('|---|---|---:|---:|---:|')
    head, dim = 4, c // 4
    ops = make_operands((b, head), dim, dim, h, w, 1, torch.float32, device, 'acmix')
    ins = [x.detach().requires_grad_(True) for x in ops[:4]] + ops[4:]
    results: Dict[str, float] = {}
    rows = []
    for name, fn in (('triton', triton_local_attention), ('lean', lean_local_attention),
                     ('unfold', unfold_local_attention)):
        def step(fn=fn):
            for x in ins[:4]:
                x.grad = None
            fn(*ins, 7, 1, 1, dim ** -0.5).sum().backward()
        seconds, peak = _time(step, device, iters)
        rows.append(('attention op', name, seconds, peak))
    x = torch.randn(*shape, device=device, requires_grad=True)
    modules = {impl: build_acmix(c, impl) for impl in ('triton', 'lean', 'unfold')}
    modules['conv3x3'] = nn.Conv2d(c, c, 3, padding=1)
    for name, module in modules.items():
        module = module.to(device)

        def step(module=module):
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).sum().backward()
        seconds, peak = _time(step, device, iters)
        results[name] = seconds
        rows.append(('layer' if name == 'conv3x3' else 'ACMix layer', name, seconds, peak))
    for what, name, seconds, peak in rows:
        print(f'| {what} | {name} | {seconds * 1e3:.2f} | {peak:.1f} | '
              f'{seconds / results["conv3x3"]:.2f}x |'.replace('| nan |', '| n/a |'))
    print()
    return True  # timings are informative; nothing to fail


# ---------------------------------------------------------------------------------------------
# 3. half precision

def check_half(device, interpret: bool) -> bool:
    import torch

    from acmix_mm.ops.local_attention import unfold_local_attention
    from acmix_mm.ops.triton_local_attention import triton_local_attention
    print('## 3. half precision (large inputs: half-precision logits would overflow)\n')
    print('| what | dtype | finite out | finite grads | max rel. error vs fp32 | ok |')
    print('|---|---|---|---|---:|---|')
    all_ok = True
    dtypes = [torch.float16, torch.bfloat16]
    torch.manual_seed(0)
    size = (1, 8, 5, 6) if interpret else (2, 64, 56, 56)
    module = build_acmix(size[1], 'triton').to(device)
    # amplitude 1: accuracy against float32; amplitude 300: |q . k| reaches ~1e5 > 65504
    # (float16's max), which only a float32 attention survives: checked for finiteness only.
    for amplitude in (1.0, 300.0):
        x = amplitude * torch.randn(*size, device=device)
        with torch.no_grad():
            reference = module(x)
        for dtype in dtypes:
            xin = x.detach().requires_grad_(True)
            module.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype):
                out = module(xin)
            # mean, not a sum of squares: float16 *weight* gradients of a large loss
            # overflow whatever the attention kernel (GradScaler's business, not ours).
            out.float().mean().backward()
            finite_out = bool(torch.isfinite(out).all())
            finite_grads = bool(torch.isfinite(xin.grad).all()) and all(
                p.grad is None or bool(torch.isfinite(p.grad).all())
                for p in module.parameters())
            rel = ((out.float() - reference).norm() / reference.norm()).item()
            limit = (5e-2 if dtype == torch.bfloat16 else 1e-2) if amplitude == 1.0 else None
            ok = finite_out and finite_grads and (limit is None or rel < limit)
            all_ok &= ok
            print(f'| ACMix autocast, input x{amplitude:g} | {str(dtype)[6:]} | {finite_out} | '
                  f'{finite_grads} | {rel:.1e}{"" if limit else " (not checked)"} '
                  f'| {"PASS" if ok else "FAIL"} |')
    # The kernel itself on half inputs (computed in float32 inside).
    for dtype in dtypes:
        hw = (4, 5) if interpret else (9, 13)
        ops = make_operands((1, 2) if interpret else (2, 4), 16, 16, *hw, 1, torch.float32, device,
                            amplitude=60.0)
        ref_in = [o.to(dtype).to(torch.float64) for o in ops]  # same rounded values
        ins = [o.to(dtype) for o in ops]
        ins = [t.requires_grad_(True) if i < 4 else t for i, t in enumerate(ins)]
        out = triton_local_attention(*ins, 7, 1, 1, 0.25)
        out.float().sum().backward()
        ref = unfold_local_attention(*ref_in, 7, 1, 1, 0.25)
        finite_out = bool(torch.isfinite(out).all())
        finite_grads = all(bool(torch.isfinite(t.grad).all()) for t in ins[:4])
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        limit = 2e-2 if dtype == torch.bfloat16 else 5e-3
        ok = finite_out and finite_grads and rel < limit
        all_ok &= ok
        print(f'| triton_local_attention | {str(dtype)[6:]} | {finite_out} | {finite_grads} | '
              f'{rel:.1e} | {"PASS" if ok else "FAIL"} |')
    print()
    return all_ok


if __name__ == '__main__':
    sys.exit(main())
