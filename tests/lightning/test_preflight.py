"""Checks that run before a run writes anything: a resume past the run's end, a config with a
syntax error, a full disk at a checkpoint write, and the progress bar of iteration-based runs."""
import errno
import os

import pytest

from acmix_mm.checkpoint import atomic
from acmix_mm.lightning import train
from acmix_mm.lightning.config import load_config
from acmix_mm.lightning.progress import IterationProgressBar
from acmix_mm.lightning.spec import RunSpec
from acmix_mm.lightning.trainer import build_trainer

from .helpers import tiny_maskrcnn_config


@pytest.mark.parametrize('first, ckpt_name, second, message', [
    (dict(max_iters=None, max_epochs=2), 'epoch=1-step=4.ckpt', dict(max_iters=None, max_epochs=1),
     "is in epoch 1 (0-based, step 4), past max_epochs=1: resume with max_epochs > 1 "
     '(train_cfg.max_epochs or --max-epochs)'),
    (dict(max_iters=2), 'last.ckpt', dict(max_iters=1),
     'is at step 2, past max_iters=1: resume with max_iters >= 2 (train_cfg.max_iters or --max-steps)'),
])
def test_resume_past_the_runs_end_fails_before_output(coco_root, tmp_path, first, ckpt_name, second, message):
    train(tiny_maskrcnn_config(coco_root, work_dir=tmp_path / 'first', **first), accelerator='cpu',
          logger=False, enable_progress_bar=False)
    ckpt = str(tmp_path / 'first' / 'checkpoints' / ckpt_name)
    with pytest.raises(ValueError) as info:
        train(tiny_maskrcnn_config(coco_root, work_dir=tmp_path / 'second', **second), resume=ckpt,
              accelerator='cpu', logger=False)
    assert str(info.value) == f'--resume: checkpoint {ckpt!r} {message}'
    assert not (tmp_path / 'second').exists()


def test_config_syntax_error_names_the_file(tmp_path):
    path = tmp_path / 'broken.py'
    path.write_text("model = dict(type='MaskRCNN'\nlr = 0.1\n")
    with pytest.raises(SyntaxError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config file {str(path)!r}, line 1: '(' was never closed")
    assert info.value.filename == str(path)


class _FullDisk:
    """A real file whose writes fail as a full disk's do, after ``room`` bytes."""

    def __init__(self, path, room):
        self.file = open(path, 'wb')
        self.room = room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_full_disk_names_file_and_bytes(tmp_path, monkeypatch):
    target = tmp_path / 'epoch=0-step=2.ckpt'
    target.write_bytes(b'previous')
    monkeypatch.setattr(atomic, 'open', lambda path, mode: _FullDisk(path, room=10), raising=False)
    with pytest.raises(OSError) as info:
        atomic.atomic_write_bytes(target, b'x' * 1000)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f'no space left to write {target} (No space left on device): it needs 1,000 bytes, ' in message
    assert ' bytes are free there; the previous file under that name, if any, is unchanged' in message
    assert target.read_bytes() == b'previous'
    assert atomic.partial_files(tmp_path) == []


def test_iteration_runs_show_steps_not_negative_epochs(coco_root, tmp_path):
    cfg = tiny_maskrcnn_config(coco_root, max_iters=7, work_dir=tmp_path / 'work')
    cfg.lightning.enable_progress_bar = True
    trainer = build_trainer(RunSpec.from_config(cfg, 'fit', work_dir=str(tmp_path / 'work')),
                            logger=False)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, IterationProgressBar)
    bar._trainer = trainer
    assert bar._get_train_description(0).rstrip() == 'Step 0/7'

    epoch_cfg = tiny_maskrcnn_config(coco_root, max_iters=None, max_epochs=3, work_dir=tmp_path / 'w2')
    epoch_cfg.lightning.enable_progress_bar = True
    epoch_trainer = build_trainer(RunSpec.from_config(epoch_cfg, 'fit', work_dir=str(tmp_path / 'w2')),
                                  logger=False)
    assert not isinstance(epoch_trainer.progress_bar_callback, IterationProgressBar)
