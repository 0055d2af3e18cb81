"""tools/benchmark_op.py: runs on a tiny shape and prints the tables; bad arguments fail clearly."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

_TOOL = os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'benchmark_op.py')


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('benchmark_op', _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prints_tables(tool, capsys):
    assert tool.main(['--shapes', '1,8,6,5', '--iters', '1', '--warmup', '0']) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| 1,8,6,5 | cpu |')]
    assert [r.split('|')[3].strip() for r in rows[:4]] == ['unfold', 'lean', 'cpp', 'conv3x3']
    peaks = [float(r.split('|')[5]) for r in rows[:4]]
    # lean and cpp keep less than unfold even on a tiny map
    assert peaks[1] < peaks[0] and peaks[2] < peaks[0], peaks
    assert 'time lean/unfold | memory lean/unfold | time cpp/unfold | memory cpp/unfold' in out
    assert 'time cpp/conv3x3 | memory cpp/conv3x3' in out
    assert len(rows) == 5  # four measurements and one ratio row


def test_compiled_cpp_row(tool, capsys):
    assert tool.main(['--shapes', '1,8,5,5', '--iters', '1', '--warmup', '0',
                      '--impls', 'cpp+compile', 'conv3x3']) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| 1,8,5,5 | cpu |')]
    assert rows[0].split('|')[3].strip() == 'cpp+compile'
    assert float(rows[0].split('|')[4]) > 0
    assert 'time cpp+compile/conv3x3' in out


@pytest.mark.parametrize('argv,message', [
    (['--shapes', '2,64,56'], 'shape must be four positive ints B,C,H,W'),
    (['--shapes', '2,0,5,5'], 'shape must be four positive ints'),
    (['--iters', '0'], 'must be a positive int'),
    (['--impls', 'flash'], "invalid choice: 'flash'"),
])
def test_bad_arguments(tool, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        tool.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error raised without CUDA')
def test_cuda_without_cuda(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main(['--device', 'cuda'])
    assert 'CUDA is not available' in capsys.readouterr().err


def test_infer_mode_times_a_no_grad_forward(tool, capsys):
    assert tool.main(['--shapes', '1,8,6,5', '--iters', '1', '--warmup', '0', '--mode', 'infer',
                      '--impls', 'auto', 'conv3x3']) == 0
    out = capsys.readouterr().out
    assert out.startswith('mode infer,')
    assert '| no-grad fwd median (ms) |' in out
    rows = [line for line in out.splitlines() if line.startswith('| 1,8,6,5 | cpu |')]
    assert [r.split('|')[3].strip() for r in rows[:2]] == ['auto', 'conv3x3']
    case = tool.Case('auto', (1, 8, 6, 5), torch.device('cpu'), 1, 'infer')
    case.step()
    assert not case.x.requires_grad and all(p.grad is None for p in case.params)
    with pytest.raises(ValueError, match="mode must be one of \\('train', 'infer'\\), got 'eval'"):
        tool.Case('auto', (1, 8, 6, 5), torch.device('cpu'), 1, 'eval')
