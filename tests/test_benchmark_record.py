"""tools/benchmark_record.py: the README's ratio table, each comparison in its own process.

Real layers and real mmdet backbones at tiny sizes; the rows' ratios must be the printed times'
ratios, the JSON record must hold the same rows, and targets are judged only at full size.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import benchmark  # noqa: E402
import benchmark_record  # noqa: E402


def test_every_comparison_names_loadable_configs():
    keys = [c.key for c in benchmark_record.COMPARISONS]
    assert keys == ['layer-56', 'layer-200', 'resnet50', 'r50-c3-c5', 'swin-t']
    for c in benchmark_record.COMPARISONS:
        if c.kind == 'layer':
            assert c.shape is not None and len(c.shape) == 4
            continue
        options = dict(o.split('=', 1) for o in c.cfg_options) or None
        a = benchmark.load_config(os.path.join(ROOT, c.config), options)
        b = benchmark.load_config(c.vs, options)
        assert 'ACMix' in a.model.backbone.type or 'ACMix' in str(a.model.backbone), c.key
        assert 'ACMix' not in str(b.model.backbone), c.key


def test_layer_and_backbone_rows_in_both_modes(tmp_path, capsys):
    record = tmp_path / 'record.json'
    rows = benchmark_record.main([
        '--only', 'layer-56', 'r50-c3-c5', '--modes', 'train', 'infer', '--shape', '64', '64',
        '--layer-shape', '1,8,6,5', '--iters', '2', '--warmup', '0', '--json', str(record)])
    out = capsys.readouterr().out
    assert [(r['key'], r['mode']) for r in rows] == [
        ('layer-56', 'train'), ('layer-56', 'infer'), ('r50-c3-c5', 'train'),
        ('r50-c3-c5', 'infer')]
    for r in rows:
        assert r['time_a_ms'] > 0 and r['time_b_ms'] > 0
        assert r['time_ratio'] == pytest.approx(r['time_a_ms'] / r['time_b_ms'])
        assert r['target'] == ''  # tiny sizes are never judged against the targets
        assert f'**{r["time_ratio"]:.2f}**' in out
    assert rows[0]['input'] == '1,8,6,5' and rows[2]['input'] == '64x64'
    assert rows[0]['pair_median'] is None
    assert rows[2]['pair_median'] > 0  # two alternated pairs
    table = [line for line in out.splitlines() if line.startswith('| ')]
    assert len(table) == 1 + len(rows)
    saved = json.loads(record.read_text())
    assert saved['rows'] == rows
    assert saved['settings']['threads'] == 2 and saved['settings']['iters'] == 2


def test_retained_freed_memory_reaches_every_comparison(tmp_path, capsys):
    record = tmp_path / 'record.json'
    rows = benchmark_record.main([
        '--only', 'layer-56', 'r50-c3-c5', '--modes', 'train', '--shape', '64', '64',
        '--layer-shape', '1,8,6,5', '--iters', '1', '--warmup', '1', '--json', str(record),
        '--retain-freed-memory'])
    out = capsys.readouterr().out
    assert 'freed memory retained' in out and 'live tensors for the backbones' in out
    # Backbone memory is then the live tensors of an iteration of its own (RSS stays at its
    # peak once freed memory is kept).
    assert rows[1]['memory'] == 'cpu_allocator'
    assert rows[1]['memory_a_mb'] > 0 and rows[1]['memory_b_mb'] > 0
    assert json.loads(record.read_text())['settings']['retain_freed_memory'] is True


def test_targets_are_judged_in_train_mode_at_full_size():
    resnet = benchmark_record.BY_KEY['resnet50']
    measured = dict(time_a_ms=150.0, time_b_ms=100.0, memory_a_mb=120.0, memory_b_mb=100.0,
                    pair_median=1.5, input='800x1344', memory='vmhwm')
    row = benchmark_record.make_row(resnet, 'train', measured)
    assert row['time_ratio'] == pytest.approx(1.5) and row['memory_ratio'] == pytest.approx(1.2)
    assert row['target'] == 'time <= 1.4: not met, memory <= 1.3: met'
    assert benchmark_record.make_row(resnet, 'infer', measured)['target'] == ''
    assert benchmark_record.make_row(resnet, 'train', measured, own_size=False)['target'] == ''
    swin = benchmark_record.BY_KEY['swin-t']
    assert benchmark_record.make_row(swin, 'train', dict(measured, time_a_ms=105.0)
                                     )['target'] == 'time <= 1.1: met'


@pytest.mark.parametrize('argv,message', [
    (['--only', 'resnet101'], "invalid choice: 'resnet101'"),
    (['--modes', 'eval'], "invalid choice: 'eval'"),
    (['--layer-shape', '1,8,6'], 'shape must be four positive ints B,C,H,W'),
    (['--iters', '0'], 'must be a positive int'),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        benchmark_record.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_json_paths_fail_before_measuring(tmp_path, capsys):
    for path, message in ((tmp_path, 'is a directory'),
                          (tmp_path / 'missing' / 'r.json', 'does not exist')):
        with pytest.raises(SystemExit):
            benchmark_record.main(['--only', 'layer-56', '--json', str(path)])
        err = capsys.readouterr().err
        assert message in err and str(path) in err
    assert list(tmp_path.iterdir()) == []
