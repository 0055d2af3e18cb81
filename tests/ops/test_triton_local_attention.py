"""The Triton local-attention kernels against the unfold reference, under Triton's interpreter.

Triton picks interpreter or compiler when its kernels are defined (at import), so the kernels
run in a child process started with ``TRITON_INTERPRET=1``: this file, run as a script with
``--child``, computes every case and prints one JSON line per case; the tests below check
the numbers. The interpreter runs each program in numpy, so the cases are tiny.

Requires triton (``requirements/tests.txt``): on purpose there is no skip when it is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import pytest
import torch

import triton  # noqa: F401  (a missing triton must fail here, loudly, not skip)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (leading dims, D, Dv, H, W, kernel, dilation, stride, dtype, layout)
CASES: Dict[str, tuple] = {
    'odd_map_k3': ((2, 1), 3, 2, 5, 7, 3, 1, 1, 'float32', 'contiguous'),
    'stride2_odd_d_ne_dv': ((2,), 5, 3, 5, 7, 3, 1, 2, 'float32', 'contiguous'),
    'dilation2': ((1, 2), 4, 4, 6, 5, 3, 2, 1, 'float32', 'contiguous'),
    'k7_three_lead_dims': ((2, 1, 1), 3, 2, 5, 6, 7, 1, 1, 'float32', 'contiguous'),
    'k7_1px_map': ((), 3, 2, 1, 1, 7, 1, 1, 'float32', 'contiguous'),
    'k7_2x3_dil2_stride2': ((1, 1), 3, 2, 2, 3, 7, 2, 2, 'float32', 'contiguous'),
    'k5_3x1_stride3': ((1, 2), 2, 3, 3, 1, 5, 1, 3, 'float32', 'contiguous'),
    # ACMix's operands: permuted views of one (B, dim, 3, head, H, W) projection, q strided.
    'acmix_views_stride2': ((2, 2), 4, 4, 5, 6, 3, 1, 2, 'float32', 'acmix'),
    'float64': ((1, 2), 3, 2, 4, 5, 3, 1, 1, 'float64', 'contiguous'),
    'float16': ((1, 2), 4, 4, 4, 5, 3, 1, 1, 'float16', 'contiguous'),
    'bfloat16': ((2,), 4, 3, 3, 4, 3, 1, 2, 'bfloat16', 'contiguous'),
}
# Half precision: the output and gradients (values up to ~2) are rounded to 11 / 8 bits.
TOLERANCE = {'float32': 1e-5, 'float64': 1e-12, 'float16': 5e-3, 'bfloat16': 4e-2}


def _operands(lead, d, dv, h, w, stride, dtype, layout, seed=0) -> List[torch.Tensor]:
    """q, k, v, q_pos, coord_x, coord_y for one case (see unfold_local_attention)."""
    gen = torch.Generator().manual_seed(seed)
    h_out, w_out = -(-h // stride), -(-w // stride)
    if layout == 'acmix':
        assert d == dv and len(lead) == 2
        qkv = torch.randn(lead[0], d, 3, lead[1], h, w, generator=gen)
        q, k, v = qkv.permute(2, 0, 3, 1, 4, 5).unbind(0)
        q = q[..., ::stride, ::stride]
    else:
        q = torch.randn(*lead, d, h_out, w_out, generator=gen)
        k = torch.randn(*lead, d, h, w, generator=gen)
        v = torch.randn(*lead, dv, h, w, generator=gen)
    q_pos = torch.randn(*lead, 2, h_out, w_out, generator=gen)
    coord_x = torch.linspace(-1.0, 1.0, w)
    coord_y = torch.linspace(-1.0, 1.0, h)
    return [x.to(getattr(torch, dtype)) for x in (q, k, v, q_pos, coord_x, coord_y)]


def _child() -> None:
    """Runs in the TRITON_INTERPRET=1 child: one JSON line of max errors per case."""
    from acmix_mm.ops.local_attention import unfold_local_attention
    from acmix_mm.ops.triton_local_attention import triton_available, triton_local_attention

    print(json.dumps({'case': '_available', 'value': triton_available()}), flush=True)
    for name, (lead, d, dv, h, w, kernel, dil, stride, dtype, layout) in CASES.items():
        ops = _operands(lead, d, dv, h, w, stride, dtype, layout)
        # The reference runs in float64 for the half cases (the kernel computes in fp32).
        ref_ops = [x.double() if dtype in ('float16', 'bfloat16') else x for x in ops]
        ins = [x.detach().requires_grad_(True) for x in ops[:4]] + ops[4:]
        ref_ins = [x.detach().requires_grad_(True) for x in ref_ops[:4]] + ref_ops[4:]
        out = triton_local_attention(*ins, kernel, dil, stride, 0.7)
        ref = unfold_local_attention(*ref_ins, kernel, dil, stride, 0.7)
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, ins[:4], grad_out.to(out.dtype))
        ref_grads = torch.autograd.grad(ref, ref_ins[:4], grad_out.to(ref.dtype))
        # Run the backward again: the gather formulation must give bitwise the same result.
        out2 = triton_local_attention(*ins, kernel, dil, stride, 0.7)
        grads2 = torch.autograd.grad(out2, ins[:4], grad_out.to(out.dtype))
        errors = {'out': (out.double() - ref.double()).abs().max().item()}
        for label, g, r in zip(('q', 'k', 'v', 'q_pos'), grads, ref_grads):
            errors[label] = (g.double() - r.double()).abs().max().item()
            errors[label + '_shape_ok'] = tuple(g.shape) == tuple(r.shape)
        errors['dtype_ok'] = out.dtype == ops[0].dtype and all(
            g.dtype == x.dtype for g, x in zip(grads, ops[:4]))
        errors['shape_ok'] = tuple(out.shape) == tuple(ref.shape)
        errors['deterministic'] = all(torch.equal(a, b) for a, b in zip(grads, grads2))
        print(json.dumps({'case': name, 'value': errors}), flush=True)

    # Saved for backward beyond the inputs: the output, the log-sum-exp and index tables only.
    ops = _operands((1, 4), 16, 16, 8, 8, 1, 'float32', 'acmix')
    ins = [x.detach().requires_grad_(True) for x in ops[:4]] + ops[4:]
    input_storages = {x.untyped_storage().data_ptr() for x in ins}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in input_storages:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = triton_local_attention(*ins, 7, 1, 1, 0.25)
    print(json.dumps({'case': '_saved', 'value': {
        'saved': sum(saved.values()), 'out': out.numel() * 4, 'lse': 4 * 8 * 8 * 4}}), flush=True)

    # torch.compile around the kernel: dynamo must break the graph there, not trace into it.
    ops = _operands((1, 2), 4, 3, 5, 6, 1, 'float32', 'contiguous')
    ins = [x.detach().requires_grad_(True) for x in ops[:4]]

    def layer(q, k, v, q_pos):
        return (triton_local_attention(q * 2.0, k, v, q_pos, *ops[4:], 3, 1, 1, 0.5) * 3.0).sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer)
    results = []
    for fn in (compiled, layer):
        value = fn(*ins)
        results.append([value] + list(torch.autograd.grad(value, ins)))
    print(json.dumps({'case': '_compiled', 'value': max(
        (a - b).abs().max().item() for a, b in zip(*results))}), flush=True)


@pytest.fixture(scope='module')
def interpreted() -> Dict[str, object]:
    """Every case's errors, computed once in a TRITON_INTERPRET=1 child process."""
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'interpreter child failed:\n{proc.stdout}\n{proc.stderr}'
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    return {entry['case']: entry['value'] for entry in lines}


def test_available_under_interpreter(interpreted):
    assert interpreted['_available'] is True


def test_saves_only_output_and_logsumexp(interpreted):
    """No (..., kernel**2, H, W) attention weights are kept: out + lse + index tables (<1 KB)."""
    sizes = interpreted['_saved']
    assert 0 <= sizes['saved'] - sizes['out'] - sizes['lse'] < 1024, sizes


def test_torch_compile_breaks_the_graph_around_the_kernels(interpreted):
    assert interpreted['_compiled'] <= 1e-5


@pytest.mark.parametrize('name', list(CASES))
def test_matches_unfold_forward_and_gradients(interpreted, name):
    errors = interpreted[name]
    tol = TOLERANCE[CASES[name][8]]
    assert errors['shape_ok'] and errors['dtype_ok'], errors
    for label in ('out', 'q', 'k', 'v', 'q_pos'):
        assert errors[label] <= tol, f'{name}: {label} differs from unfold by {errors[label]}'
    for label in ('q', 'k', 'v', 'q_pos'):
        assert errors[label + '_shape_ok'], f'{name}: grad {label} has the wrong shape'
    assert errors['deterministic'], f'{name}: two backward passes differ'


# In-process (no interpreter: the kernels here are compiled-mode and never launched on CPU).

def test_availability_follows_cuda_without_interpreter():
    from acmix_mm.ops import triton_local_attention as mod
    if os.environ.get('TRITON_INTERPRET') not in (None, '', '0'):
        pytest.fail('run this test without TRITON_INTERPRET in the environment')
    assert mod.triton_available() == torch.cuda.is_available()


def test_cpu_tensors_are_refused_without_interpreter():
    from acmix_mm.ops.triton_local_attention import triton_local_attention
    ops = _operands((1, 1), 2, 2, 3, 3, 1, 'float32', 'contiguous')
    if torch.cuda.is_available():
        pytest.fail('this check is for machines without CUDA; tools/check_gpu.py covers CUDA')
    with pytest.raises(RuntimeError, match='needs CUDA tensors, got device cpu'):
        triton_local_attention(*ops, 3)


@pytest.mark.parametrize('bad,match', [
    ('int', 'dtype must be one of'),
    ('mixed', 'q is torch.float32 but v is torch.float64'),
    ('even_kernel', 'kernel must be a positive odd int, got 4'),
])
def test_bad_inputs_are_named(bad, match):
    from acmix_mm.ops.triton_local_attention import triton_local_attention
    ops = _operands((1, 1), 2, 2, 3, 3, 1, 'float32', 'contiguous')
    kernel = 3
    if bad == 'int':
        ops = [x.to(torch.int32) for x in ops]
    elif bad == 'mixed':
        ops[2] = ops[2].double()
    else:
        kernel = 4
    with pytest.raises(ValueError, match=match):
        triton_local_attention(*ops, kernel)


@pytest.mark.parametrize('size', [1, 2, 3, 4, 7])
@pytest.mark.parametrize('pad', [0, 1, 3, 6])
def test_inverse_padding_tables(size, pad):
    """Each padded position is listed exactly once, under the pixel it reads."""
    from acmix_mm.ops.triton_local_attention import _tables
    from acmix_mm.ops.window import reflect_index
    table, inverse, max_count = _tables(size, pad, 'cpu')
    expected = reflect_index(size, pad)
    assert table.dtype == torch.int32 and torch.equal(table.long(), expected)
    assert inverse.shape == (size, max_count)
    listed = sorted(int(p) for p in inverse.flatten() if p >= 0)
    assert listed == list(range(size + 2 * pad))
    for pixel in range(size):
        for p in inverse[pixel]:
            if p >= 0:
                assert int(expected[p]) == pixel


# Compiled mode without a GPU: Triton's full CUDA pipeline (ttir -> ptx -> ptxas cubin) runs
# on the CPU for a named target, so the kernels' code generation for an H100 (sm_90) is
# checked here too; cuobjdump then reads each kernel's registers and stack (spill) use.

_INT_TABLES = ('rows_ptr', 'cols_ptr', 'inv_rows_ptr', 'inv_cols_ptr')
_COMPUTE_PTRS = ('scale_ptr', 'cx_ptr', 'cy_ptr', 'lse_ptr', 'delta_ptr', 'gk_ptr', 'gv_ptr',
                 'src_ptr')


def _compile_sm90(fn, io: str, compute: str, constexprs: Dict[str, object], num_warps: int
                  ) -> Dict[str, int]:
    """Compile ``fn`` for sm_90; {'REG': registers per thread, 'STACK': bytes of stack}."""
    import re
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name in _INT_TABLES:
            signature[name] = '*i32'
        elif name in _COMPUTE_PTRS:
            signature[name] = '*' + compute
        elif name.endswith('_ptr'):
            signature[name] = '*' + io
        else:
            signature[name] = 'i32'
    kernel = triton.compile(ASTSource(fn, signature, constexprs),
                            target=GPUTarget('cuda', 90, 32),
                            options={'num_warps': num_warps, 'enable_fp_fusion': True})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                             'cuobjdump')
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'kernel.cubin')
        with open(path, 'wb') as f:
            f.write(kernel.asm['cubin'])
        usage = subprocess.run([cuobjdump, '-res-usage', path], capture_output=True, text=True,
                               check=True).stdout
    found = dict((k, int(v)) for k, v in re.findall(r'(REG|STACK):(\d+)', usage))
    assert set(found) == {'REG', 'STACK'}, usage
    return found


_COMPILE_CASES = [(16, 'fp32', 'fp32')]
_COMPILE_CASES_SLOW = [(d, 'fp32', 'fp32') for d in (8, 32, 64, 128, 256)] + [
    (16, 'fp16', 'fp32'), (16, 'bf16', 'fp32'), (16, 'fp64', 'fp64')]


@pytest.mark.parametrize('head_dim,io,compute', _COMPILE_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in _COMPILE_CASES_SLOW])
def test_kernels_compile_for_sm90_without_spills(head_dim, io, compute):
    """The launch configuration ACMix gets compiles for an H100 and spills no registers."""
    import triton.language as tl

    from acmix_mm.ops import triton_kernels
    from acmix_mm.ops import triton_local_attention as mod
    dtype = {'fp32': torch.float32, 'fp64': torch.float64}[compute]
    block_d, block_dv, block_p, num_warps = mod._launch_config(head_dim, head_dim, dtype)
    cdt = {'fp32': tl.float32, 'fp64': tl.float64}[compute]
    meta = dict(KERNEL=7, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_P=block_p, CDT=cdt)
    for fn in (triton_kernels.fwd_kernel, triton_kernels.bwd_query_kernel,
               triton_kernels.bwd_key_kernel):
        usage = _compile_sm90(fn, io, compute, meta, num_warps)
        assert usage['STACK'] == 0, f'{fn.__name__} spills at head_dim {head_dim}: {usage}'
        assert usage['REG'] <= 255, usage
    usage = _compile_sm90(triton_kernels.fold_kernel, compute, compute,
                          dict(MAX_R=2, MAX_C=2, BLOCK_P=256, CDT=cdt), 4)
    assert usage['STACK'] == 0, usage


@pytest.mark.slow
def test_check_gpu_script_runs_under_the_interpreter():
    """tools/check_gpu.py --interpret: every section runs and passes (~1 min of CPU)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    env.pop('TRITON_INTERPRET', None)  # the script's flag must set it by itself
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'check_gpu.py'),
                           '--interpret'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f'{proc.stdout}\n{proc.stderr}'
    for section in ('## 1. triton vs unfold', '## 2. forward+backward', '## 3. half precision'):
        assert section in proc.stdout
    assert 'FAIL' not in proc.stdout and proc.stdout.rstrip().endswith('ALL PASS')


if __name__ == '__main__':
    if sys.argv[1:] != ['--child']:
        sys.exit('usage: TRITON_INTERPRET=1 python tests/ops/test_triton_local_attention.py '
                 '--child')
    _child()
