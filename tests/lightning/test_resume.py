"""Kill and resume: a run stopped at any moment and resumed ends exactly where an uninterrupted run ends.

* The checkpoint writer (AtomicCheckpointIO) leaves a checkpoint complete or absent, also when
  the writing process is SIGKILLed in the middle of a write.
* The training loader (ResumableDataLoader) continues an epoch after the checkpointed batch with
  the same samples and the same augmentation random numbers.
* A run crashed in-process (quick) or SIGKILLed as a real ``tools/train.py`` subprocess (slow,
  two kills at different moments) and resumed with ``--resume`` ends with the same global step,
  epoch, learning rate, optimiser state (every tensor), weights, schedules, random states and
  evaluation metric as an uninterrupted run with the same seed, on CPU.
"""
from __future__ import annotations

import csv
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from mmengine.dataset import DefaultSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset

from acmix_mm.lightning import train
from acmix_mm.lightning.api import newest_checkpoint
from acmix_mm.checkpoint.atomic import atomic_write_bytes, partial_files
from acmix_mm.lightning.checkpoint_io import AtomicCheckpointIO
from acmix_mm.lightning.resumable import ResumableDataLoader

from .helpers import make_coco, tiny_maskrcnn_config

REPO = Path(__file__).resolve().parents[2]


# -- the checkpoint writer ---------------------------------------------------------------------------
_WRITER = '''
import sys
sys.path.insert(0, {repo!r})
from acmix_mm.checkpoint.atomic import atomic_write_bytes
atomic_write_bytes({path!r}, b'N' * {size})
'''


def test_atomic_write_killed_mid_write_leaves_old_file(tmp_path):
    """SIGKILL a process while it writes 96 MiB over a good file: the target keeps its old bytes."""
    target = tmp_path / 'last.ckpt'
    old = b'old checkpoint bytes'
    atomic_write_bytes(str(target), old)
    size = 96 << 20
    observed_partial = []
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, '-c', _WRITER.format(repo=str(REPO), path=str(target), size=size)])
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                sizes = [os.path.getsize(p) for p in partial_files(str(tmp_path)) if os.path.exists(p)]
                if any(0 < s < size for s in sizes):
                    os.kill(proc.pid, signal.SIGKILL)
                    observed_partial.append(max(sizes))
                    break
                time.sleep(0.0005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        # Whatever the moment of death, the name holds a whole file: the old one or the new one.
        content = target.read_bytes()
        assert content == old or content == b'N' * size, (attempt, len(content))
        if observed_partial:
            assert content == old  # killed before the rename: untouched
            break
        atomic_write_bytes(str(target), old)  # the writer won the race: try again
    assert observed_partial, 'never caught the writer mid-write in 5 attempts'
    # The killed writer's temporary file is there; the next save into the folder removes it.
    assert partial_files(str(tmp_path))
    AtomicCheckpointIO().save_checkpoint({'step': torch.tensor(3)}, str(target))
    assert partial_files(str(tmp_path)) == []
    assert torch.load(target, weights_only=True)['step'].item() == 3


def test_atomic_write_error_leaves_target_and_no_temp_file(tmp_path):
    target = tmp_path / 'a.ckpt'
    atomic_write_bytes(str(target), b'good')
    with pytest.raises(TypeError):
        atomic_write_bytes(str(target), 'not bytes')  # type: ignore[arg-type]
    assert target.read_bytes() == b'good'
    assert partial_files(str(tmp_path)) == []
    with pytest.raises(TypeError, match='storage_options'):
        AtomicCheckpointIO().save_checkpoint({}, str(target), storage_options={'x': 1})


# -- the resumable loader ----------------------------------------------------------------------------
class _RandomDataset(Dataset):
    """Each item draws from all three global generators, like an augmentation pipeline."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        return (index, random.random(), float(np.random.rand()), float(torch.rand(())))


def _loader(per_sample: bool = True, num_workers: int = 0, persistent: bool = False) -> ResumableDataLoader:
    dataset = _RandomDataset()
    sampler = DefaultSampler(dataset, shuffle=True, seed=3)
    base = DataLoader(dataset, batch_sampler=BatchSampler(sampler, 3, drop_last=False), num_workers=num_workers,
                      persistent_workers=persistent and num_workers > 0, collate_fn=list)
    return ResumableDataLoader.wrap(base, base_seed=11 if per_sample else None)


def _epoch(loader: ResumableDataLoader, epoch: int) -> List[list]:
    loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning calls at every epoch start
    return [batch for batch in loader]


def test_loader_resumes_mid_epoch_with_same_samples_and_random_numbers():
    reference = _loader()
    epochs = [_epoch(reference, e) for e in range(2)]
    assert [len(b) for b in epochs[0]] == [3, 3, 3, 1]
    assert sorted(s[0] for b in epochs[0] for s in b) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled and re-augmented

    interrupted = _loader()
    interrupted.batch_sampler.sampler.set_epoch(1)
    taken = []
    for batch in interrupted:
        taken.append(batch)
        if len(taken) == 2:
            break
    state = interrupted.state_dict()
    assert state == {'epoch': 1, 'batches': 2, 'base_seed': 11, 'sampler_seed': 3}

    torch.manual_seed(123)  # a resumed process's global generators are wherever they are
    np.random.seed(123)
    resumed = _loader()
    resumed.load_state_dict(state)
    assert taken + _epoch(resumed, 1) == epochs[1]
    assert resumed.state_dict()['batches'] == 4
    assert _epoch(resumed, 2) == _epoch(_fresh_at(2), 2)  # the next epoch is whole again


def _fresh_at(epoch: int) -> ResumableDataLoader:
    loader = _loader()
    loader.batch_sampler.sampler.set_epoch(epoch)
    return loader


def test_loader_state_of_another_epoch_skips_nothing():
    loader = _loader()
    loader.load_state_dict({'epoch': 0, 'batches': 4})  # saved at the end of epoch 0
    assert _epoch(loader, 1) == _epoch(_loader(), 1)
    with pytest.raises(ValueError, match='batches'):
        loader.load_state_dict({'epoch': 0})


def test_loader_keeps_the_config_samplers_and_counts_epochs_without_set_epoch():
    from torch.utils.data import SequentialSampler
    loader = _loader()
    assert isinstance(loader.batch_sampler, BatchSampler) and isinstance(loader.sampler, SequentialSampler)
    assert isinstance(loader.resumable_sampler.index_sampler, DefaultSampler) and len(loader) == 4
    # A sampler with no epoch (no set_epoch): passes are counted, each pass is a new epoch.
    dataset = _RandomDataset()
    plain = lambda: ResumableDataLoader(dataset, batch_size=4, sampler=SequentialSampler(dataset),  # noqa: E731
                                        collate_fn=list, base_seed=2)
    reference = plain()
    passes = [list(reference) for _ in range(3)]
    assert passes[0] != passes[1] != passes[2]  # re-augmented each epoch
    assert [s[0] for s in passes[1][0]] == [0, 1, 2, 3]
    interrupted = plain()
    list(interrupted)
    it = iter(interrupted)
    taken = [next(it)]
    resumed = plain()
    resumed.load_state_dict(interrupted.state_dict())
    assert interrupted.state_dict()['epoch'] == 1
    assert taken + list(resumed) == passes[1]
    assert list(resumed) == passes[2]


def test_per_sample_seeding_independent_of_workers_and_history():
    torch.manual_seed(9)
    single = [_epoch(_loader(), e) for e in range(2)]
    after_single = torch.rand(3)
    for persistent in (False, True):
        torch.manual_seed(9)
        workers = _loader(num_workers=2, persistent=persistent)
        assert [_epoch(workers, e) for e in range(2)] == single
        # The main process's torch stream is the same too (one draw per epoch in every case).
        assert torch.equal(torch.rand(3), after_single)
    # Loading leaves the main process's generators alone (dropout, RoI sampling draw from them),
    # but for the one number any DataLoader draws from torch when it creates its iterator.
    torch.manual_seed(5)
    np.random.seed(5)
    torch.empty((), dtype=torch.int64).random_()
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(5)
    np.random.seed(5)
    _epoch(_loader(), 0)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    # Without per-sample seeding the numbers come from the global generators (mmengine's way).
    _seed_all(0)
    plain = _epoch(_loader(per_sample=False), 0)
    _seed_all(0)
    assert _epoch(_loader(per_sample=False), 0) == plain
    assert plain != single[0]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- training: crash in-process and resume (quick) ---------------------------------------------------
class _Crash(Callback):
    """Raise after the batch that makes ``global_step == at`` (after any checkpoint of that step)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError(f'simulated crash at step {self.at}')


def resume_config(data_root: Path, *, max_iters: Optional[int] = None, max_epochs: Optional[int] = None,
                  interval: int = 2, validate: bool = True, num_workers: int = 0):
    """Tiny Mask R-CNN, 6 training images in batches of 2 (3 batches an epoch), shuffled, flipped."""
    cfg = tiny_maskrcnn_config(data_root, max_iters=max_iters, max_epochs=max_epochs, shuffle=True)
    if max_iters is not None:
        cfg.train_cfg.val_interval = interval
    cfg.train_dataloader.dataset.pipeline.insert(3, dict(type='RandomFlip', prob=0.5))
    cfg.train_dataloader.num_workers = num_workers
    cfg.train_dataloader.persistent_workers = num_workers > 0
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
    cfg.lightning = dict(enable_progress_bar=False, loggers=['csv'], log_every_n_steps=1)
    if not validate:
        for key in ('val_dataloader', 'val_evaluator', 'val_cfg'):
            cfg.pop(key)
    return cfg


def assert_same_final_state(expected: Dict[str, Any], got: Dict[str, Any]) -> None:
    """Global step, epoch, loop counters, lr, optimiser state, weights, schedules, RNG and data state."""
    assert got['global_step'] == expected['global_step']
    assert got['epoch'] == expected['epoch']
    assert got['loops']['fit_loop']['epoch_progress'] == expected['loops']['fit_loop']['epoch_progress']
    assert (got['loops']['fit_loop']['epoch_loop.batch_progress']['total']
            == expected['loops']['fit_loop']['epoch_loop.batch_progress']['total'])
    assert got['mm_param_schedulers'] == expected['mm_param_schedulers']
    assert got['train_loader_state'] == expected['train_loader_state']
    (opt_e,), (opt_g,) = expected['optimizer_states'], got['optimizer_states']
    assert [g['lr'] for g in opt_g['param_groups']] == [g['lr'] for g in opt_e['param_groups']]
    assert opt_g['state'].keys() == opt_e['state'].keys() and opt_e['state']
    for key, state in opt_e['state'].items():
        for name, value in state.items():
            assert torch.allclose(opt_g['state'][key][name], value, rtol=0, atol=1e-6), (key, name)
    assert got['state_dict'].keys() == expected['state_dict'].keys()
    for name, value in expected['state_dict'].items():
        assert torch.allclose(got['state_dict'][name].double(), value.double(), rtol=0, atol=1e-6), name
    assert torch.equal(got['rng_states']['torch'], expected['rng_states']['torch'])
    assert torch.equal(got['rng_states']['numpy']['state'], expected['rng_states']['numpy']['state'])
    assert got['rng_states']['python'] == expected['rng_states']['python']


def _load(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def coco6(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp('coco6'), n_train=6, n_val=3)


def test_crash_mid_epoch_and_resume_equals_uninterrupted(coco6, tmp_path):
    # Checkpoints every 2 steps, 3 batches an epoch: the step-2 checkpoint is mid-epoch (the data
    # must continue at batch 3 of epoch 0) and the crash at step 3 loses one step of work.
    cfg = resume_config(coco6, max_iters=5, validate=False)
    reference = train(cfg.copy(), work_dir=str(tmp_path / 'ref'), accelerator='cpu')
    work = tmp_path / 'crashed'
    with pytest.raises(RuntimeError, match='simulated crash at step 3'):
        train(cfg.copy(), work_dir=str(work), accelerator='cpu', callbacks=[_Crash(3)])
    last = work / 'checkpoints' / 'last.ckpt'
    assert _load(last)['global_step'] == 2 and _load(last)['train_loader_state']['batches'] == 2
    resumed = train(cfg.copy(), work_dir=str(work), resume='auto', accelerator='cpu')
    assert resumed.global_step == reference.global_step == 5
    assert_same_final_state(_load(tmp_path / 'ref' / 'checkpoints' / 'last.ckpt'), _load(last))
    # The resumed process logged the same losses for steps 3..5 as the reference run.
    ref_losses = csv_losses(tmp_path / 'ref')
    got_losses = csv_losses(work)
    assert sorted(got_losses) == [2, 3, 4]  # CSV rows are 0-based steps
    for step, value in got_losses.items():
        assert value == pytest.approx(ref_losses[step], rel=0, abs=1e-6), step


def csv_rows(work_dir: Path) -> List[Dict[str, str]]:
    """The rows of the newest ``csv/version_*/metrics.csv`` (the last process's log)."""
    versions = sorted((work_dir / 'csv').glob('version_*'), key=lambda p: int(p.name.split('_')[1]))
    with open(versions[-1] / 'metrics.csv') as f:
        return list(csv.DictReader(f))


def csv_losses(work_dir: Path, key: str = 'train/loss') -> Dict[int, float]:
    return {int(row['step']): float(row[key]) for row in csv_rows(work_dir) if row.get(key)}


def csv_metrics(work_dir: Path) -> Dict[str, float]:
    """The last evaluation's metrics (``coco/*``) of the newest log."""
    rows = [row for row in csv_rows(work_dir) if row.get('coco/bbox_mAP')]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith('coco/') and v != ''}


# -- training: resume from every checkpoint of a run --------------------------------------------------
def _every_checkpoint_config(data_root: Path, loop: str):
    """Warm-up then cosine, both by iteration; flips and shuffling; validation loader workers that
    persist (their iterator is made once per process: the draw that broke resumes)."""
    if loop == 'epoch':
        cfg = resume_config(data_root, max_epochs=3)   # checkpoints at steps 3, 6, 9
    else:
        cfg = resume_config(data_root, max_iters=8, interval=2)  # steps 2, 4, 6, 8 (2 and 4 mid-epoch)
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
    ends = 3 if loop == 'epoch' else 8
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
        dict(type='CosineAnnealingLR', T_max=ends, by_epoch=loop == 'epoch', begin=0, end=ends,
             **(dict(convert_to_iter_based=True) if loop == 'epoch' else {}))]
    for key in ('val_dataloader', 'test_dataloader'):
        cfg[key].update(num_workers=2, persistent_workers=True)
    return cfg


@pytest.mark.parametrize('loop', ['epoch', 'iter'])
def test_resume_from_every_checkpoint_equals_uninterrupted(coco6, tmp_path, loop):
    cfg = _every_checkpoint_config(coco6, loop)
    ref = tmp_path / 'ref'
    train(cfg.copy(), work_dir=str(ref), accelerator='cpu')
    names = sorted((p.name for p in (ref / 'checkpoints').glob('epoch=*.ckpt')),
                   key=lambda n: int(n.split('step=')[1].split('.')[0]))
    assert names == (['epoch=0-step=3.ckpt', 'epoch=1-step=6.ckpt', 'epoch=2-step=9.ckpt'] if loop == 'epoch' else
                     ['epoch=0-step=2.ckpt', 'epoch=1-step=4.ckpt', 'epoch=1-step=6.ckpt', 'epoch=2-step=8.ckpt'])
    final = _load(ref / 'checkpoints' / names[-1])
    for name in names[:-1]:
        work = tmp_path / f'from_{name}'
        (work / 'checkpoints').mkdir(parents=True)
        shutil.copy(ref / 'checkpoints' / name, work / 'checkpoints' / name)
        train(cfg.copy(), work_dir=str(work), resume='auto', accelerator='cpu')
        assert_same_final_state(final, _load(work / 'checkpoints' / names[-1]))
        assert csv_metrics(work) == pytest.approx(csv_metrics(ref), abs=1e-6), name


# -- training: kill -9 a real tools/train.py and resume (slow) ---------------------------------------
def _start(config: Path, work: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, 'tools/train.py', str(config), '--work-dir', str(work), '--accelerator', 'cpu']
    if resume:
        args.append('--resume')
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ckpt_names(folder: Path) -> set:
    return {p.name for p in folder.glob('*.ckpt')} if folder.is_dir() else set()


def _kill_when(proc: subprocess.Popen, folder: Path, *, after_new_ckpt: bool, delay: float,
               timeout: float = 900) -> str:
    """SIGKILL ``proc`` ``delay`` s after a new checkpoint file appears; with ``after_new_ckpt``
    False, the moment a temporary checkpoint file or a new ``.ckpt`` (last.ckpt included) appears.
    Returns what was seen."""
    before = _ckpt_names(folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'train.py ended ({proc.returncode}) before the kill:\n'
                                 f'{proc.stderr.read().decode()[-4000:]}')
        if not after_new_ckpt and partial_files(str(folder)):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return 'while a checkpoint was being written'
        new = _ckpt_names(folder) - before - ({'last.ckpt'} if after_new_ckpt else set())
        if new:
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return f'{delay:.2f} s after {sorted(new)} appeared'
        time.sleep(0.001)
    proc.kill()
    raise AssertionError('no checkpoint appeared in time')


def _all_checkpoints_load(folder: Path) -> None:
    for path in folder.glob('*.ckpt'):
        _load(path)  # a truncated file would raise here


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err.decode()[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize('loop,workers', [('iter', 0), ('epoch', 2)])
def test_kill9_and_resume_equals_uninterrupted(coco6, tmp_path, loop, workers, capsys):
    """Two SIGKILLs of tools/train.py (mid-interval, and as soon as a checkpoint is being written
    or has just appeared), ``--resume`` after each: the end state equals an uninterrupted run's."""
    if loop == 'iter':
        cfg = resume_config(coco6, max_iters=8, interval=2, num_workers=workers)
    else:
        cfg = resume_config(coco6, max_epochs=3, num_workers=workers)
    config = tmp_path / f'resume_{loop}.py'
    cfg.dump(str(config))
    ref = tmp_path / 'ref'
    _finish(_start(config, ref, resume=False))

    work = tmp_path / 'killed'
    folder = work / 'checkpoints'
    kills = []
    # Kill 1: mid-interval, 0.25 s after the first checkpoint (the next steps are under way).
    proc = _start(config, work, resume=False)
    seen = _kill_when(proc, folder, after_new_ckpt=True, delay=0.25)
    _all_checkpoints_load(folder)
    # A kill between writing epoch=E-step=S.ckpt and last.ckpt leaves last.ckpt older or absent;
    # --resume (auto) takes the newest whole checkpoint either way.
    kills.append((seen, _load(newest_checkpoint(str(folder)))['global_step']))
    # Kill 2: after resuming, the moment the next checkpoint write starts (or its file appears).
    proc = _start(config, work, resume=True)
    seen = _kill_when(proc, folder, after_new_ckpt=False, delay=0.0)
    _all_checkpoints_load(folder)
    assert not any(p.name.endswith('.ckpt') and p.stat().st_size == 0 for p in folder.iterdir())
    kills.append((seen, _load(newest_checkpoint(str(folder)))['global_step']))
    # Resume to the end.
    _finish(_start(config, work, resume=True))
    assert partial_files(str(folder)) == []

    assert_same_final_state(_load(ref / 'checkpoints' / 'last.ckpt'), _load(folder / 'last.ckpt'))
    expected_metrics = csv_metrics(ref)
    got_metrics = csv_metrics(work)
    assert expected_metrics and got_metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        assert got_metrics[name] == pytest.approx(value, abs=1e-6), name
    ref_losses, got_losses = csv_losses(ref), csv_losses(work)
    assert got_losses and all(math.isclose(v, ref_losses[s], abs_tol=1e-6) for s, v in got_losses.items())
    with capsys.disabled():
        print(f'\n[{loop}, workers={workers}] kills (when, last.ckpt global_step): {kills}')


def test_resume_auto_without_a_checkpoint_says_so(tmp_path):
    from acmix_mm.lightning.api import resolve_resume
    (tmp_path / 'checkpoints').mkdir()
    # A run killed while writing its first checkpoint leaves only the writer's temporary file.
    (tmp_path / 'checkpoints' / '.last.ckpt.partial-abc').write_bytes(b'half')
    with pytest.raises(FileNotFoundError, match='has not written a checkpoint yet'):
        resolve_resume('auto', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='nope.ckpt'):
        resolve_resume(str(tmp_path / 'nope.ckpt'), str(tmp_path))
    assert resolve_resume(None, str(tmp_path)) is None


def test_resume_auto_takes_the_newest_whole_checkpoint(tmp_path):
    from acmix_mm.lightning.api import resolve_resume
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    for name, mtime in (('epoch=0-step=2.ckpt', 100), ('last.ckpt', 101)):
        (folder / name).write_bytes(b'x')
        os.utime(folder / name, ns=(mtime * 10**9, mtime * 10**9))
    assert resolve_resume('auto', str(tmp_path)) == str(folder / 'last.ckpt')
    # Killed after the step-4 file was renamed into place, before last.ckpt was updated.
    (folder / 'epoch=1-step=4.ckpt').write_bytes(b'x')
    os.utime(folder / 'epoch=1-step=4.ckpt', ns=(102 * 10**9, 102 * 10**9))
    (folder / '.last.ckpt.partial-abc').write_bytes(b'half')
    assert resolve_resume('auto', str(tmp_path)) == str(folder / 'epoch=1-step=4.ckpt')
    # Killed before last.ckpt was ever written.
    (folder / 'last.ckpt').unlink()
    assert resolve_resume('auto', str(tmp_path)) == str(folder / 'epoch=1-step=4.ckpt')
