"""Corrupt, foreign and unsafe checkpoints at every entry point: one table, one message each.

Rows are (kind of bad file) x (entry point). Every row asserts that the error names the file
and says what is wrong with it, that nothing of a booby-trapped file ran (its marker file never
appears) and that the run left no output. The entry points are the real ones:

* ``test``       -- ``acmix_mm.lightning.test(cfg, CKPT)``, what ``tools/test.py CONFIG CKPT`` runs;
* ``resume``     -- ``acmix_mm.lightning.train(cfg, resume=CKPT)``, ``tools/train.py --resume CKPT``;
* ``load_from``  -- ``train(cfg)`` with ``cfg.load_from=CKPT``;
* ``pretrained`` -- an ACMix backbone with ``init_cfg=dict(type='Pretrained', checkpoint=CKPT)``,
  built through the registry as a config builds it, then ``init_weights()``.

``test_cli_rows`` runs one row per entry point through the command-line tools in a subprocess.
The bad files are built in a temporary folder from tiny real models: the tiny stock mmdet Mask
R-CNN of ``helpers.py`` (the model under test for the whole-model entry points), a tiny ACMix
Mask R-CNN, a tiny mmseg segmentor and an mmdet ResNet-50 backbone (the foreign models).
"""
from __future__ import annotations

import builtins
import copy
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch
from mmengine.config import Config

from acmix_mm.lightning import MMLightningModule, test as run_test, train as run_train
from acmix_mm.checkpoint import CheckpointError, load_checkpoint_dict, load_model_weights
from acmix_mm.lightning.start_checkpoint import StartCheckpoint
from acmix_mm.registry import build_model

from .helpers import tiny_maskrcnn_config

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- payloads
class _System:
    """Unpickling calls os.system('touch MARKER')."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _Eval:
    """Unpickling calls builtins.eval("open(MARKER, 'w')")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


class _Popen:
    """Unpickling calls subprocess.Popen(['touch', MARKER])."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (['touch', str(self.marker)],)


def test_payloads_are_armed(tmp_path):
    """Each payload does create its marker under a plain unpickler, so the rows below can fail."""
    for i, payload in enumerate((_System, _Eval, _Popen)):
        marker = tmp_path / f'armed{i}'
        obj = pickle.loads(pickle.dumps(payload(marker)))
        if isinstance(obj, subprocess.Popen):
            obj.wait()
        elif hasattr(obj, 'close'):
            obj.close()
        assert marker.exists(), payload


# --------------------------------------------------------------------------- models
def acmix_maskrcnn_config(data_root: Path) -> Config:
    """The tiny Mask R-CNN of helpers.py on a ResNetACMix-26 backbone (16 base channels)."""
    cfg = tiny_maskrcnn_config(data_root, max_iters=1)
    cfg.model.backbone = dict(type='acmix_mm.ResNetACMix', depth=26, base_channels=16,
                              out_indices=(0, 1, 2, 3), acmix_stages=(False, False, True, True), head=4)
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    return cfg


def segmentor_state_dict() -> Dict[str, torch.Tensor]:
    """A tiny mmseg EncoderDecoder (ResNet-18 layout + FCN head): another task's model."""
    model = build_model(dict(
        type='mmseg.EncoderDecoder',
        data_preprocessor=dict(type='mmseg.SegDataPreProcessor'),
        backbone=dict(type='mmseg.ResNetV1c', depth=18, base_channels=16, stem_channels=16),
        decode_head=dict(type='mmseg.FCNHead', in_channels=128, channels=16, num_convs=1, num_classes=4,
                         in_index=3)))
    return model.state_dict()


def resnet50_state_dict() -> Dict[str, torch.Tensor]:
    """mmdet's ResNet-50 (torchvision key layout, as ``torchvision://resnet50``), 8 base channels."""
    model = build_model(dict(type='mmdet.ResNet', depth=50, base_channels=8, stem_channels=8))
    return model.state_dict()


@pytest.fixture(scope='module')
def det_cfg(coco_root) -> Config:
    """The model under test for the whole-model entry points: the tiny stock mmdet Mask R-CNN."""
    return tiny_maskrcnn_config(coco_root, max_iters=1)


@pytest.fixture(scope='module')
def det_model(det_cfg):
    return MMLightningModule(det_cfg, init_weights=False).model


def training_checkpoint(state_dict: Dict[str, torch.Tensor], **extra) -> dict:
    """What tools/train.py writes (see module.py's on_save_checkpoint), for a given model's weights."""
    return dict({'epoch': 0, 'global_step': 1, 'pytorch-lightning_version': '2.6.6', 'loops': {},
                 'optimizer_states': [{'state': {}, 'param_groups': []}], 'lr_schedulers': [],
                 'meta': {'epoch': 0, 'iter': 1}, 'state_dict': dict(state_dict),
                 'state_dict_layout': 'mmengine'}, **extra)


# --------------------------------------------------------------------------- bad files
def _save(path: Path, obj, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _cut(path: Path, good: Path, keep: Callable[[int], int]) -> Path:
    data = good.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    return path


def _flip_tensor_bytes(path: Path, good_obj: dict) -> Path:
    """A torch.save file with 8 bytes of one tensor's data overwritten (a bad disk or copy)."""
    tensor = next(v for v in good_obj['state_dict'].values() if v.numel() >= 64 and v.dtype == torch.float32)
    _save(path, good_obj)
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    data[at + 8:at + 16] = b'\xff' * 8
    path.write_bytes(bytes(data))
    return path


def _trap(payload):
    def make(path: Path, good_obj: dict, marker: Path) -> Path:
        # A valid checkpoint otherwise: the trap sits in the metadata, where nothing else fails first.
        return _save(path, dict(good_obj, meta={'note': payload(marker)}))
    return make


def _raw_pickle(path: Path, good_obj: dict, marker: Path) -> Path:
    """A plain ``pickle.dump`` (protocol 4, which torch's reader cannot even parse) with a trap."""
    with open(path, 'wb') as f:
        pickle.dump({'weights': [1.0, 2.0], 'x': _System(marker)}, f, protocol=4)
    return path


def _zip_not_torch(path: Path, good_obj: dict, marker: Path) -> Path:
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('weights.txt', '1 2 3')
    return path


class _Arbitrary:
    """An ordinary class: building it is as much code execution as calling os.system."""


FILE = r"checkpoint '{path}'"
TRUNCATED = FILE + r' is truncated or corrupt: a torch\.save zip archive of \d+ bytes without its end'
REFUSED = r"refusing to load checkpoint '{path}': its pickle calls or builds {name}.*nothing of it was executed"

# kind -> (how to make the file from (path, good object, marker), expected message regex).
# '{path}' is replaced by the file's path (escaped).
KINDS: Dict[str, Tuple[Callable, str]] = {
    'empty': (lambda p, g, m: (p.write_bytes(b''), p)[1], FILE + r' is empty \(0 bytes\)'),
    'cut in the zip header': (lambda p, g, m: _cut(p, _save(p.with_suffix('.good'), g), lambda n: 20), TRUNCATED),
    'cut in the data': (lambda p, g, m: _cut(p, _save(p.with_suffix('.good'), g), lambda n: n // 2), TRUNCATED),
    'last bytes missing': (lambda p, g, m: _cut(p, _save(p.with_suffix('.good'), g), lambda n: n - 10), TRUNCATED),
    'legacy format cut': (lambda p, g, m: _cut(p, _save(p.with_suffix('.good'), g, _use_new_zipfile_serialization=False),
                                              lambda n: n // 2), FILE + r' is truncated or corrupt \(\d+ bytes; reading'),
    'flipped tensor bytes': (lambda p, g, m: _flip_tensor_bytes(p, g),
                             FILE + r" is corrupt: its record '[^']*data/\d+' fails the CRC-32 check"),
    'random bytes': (lambda p, g, m: (p.write_bytes(np.random.default_rng(0).bytes(4096)), p)[1],
                     FILE + r' is not a torch\.save file: it starts with .* binary data of an unknown format'),
    'JSON file': (lambda p, g, m: (p.write_text(json.dumps({'state_dict': {'w': [1.0, 2.0]}})), p)[1],
                  FILE + r' is not a torch\.save file: it starts with .*JSON'),
    'zip, not torch': (_zip_not_torch, FILE + r' is a zip archive but not a torch\.save checkpoint: it has no data\.pkl'),
    'os.system': (_trap(_System), REFUSED.replace('{name}', r'os\.system \(stored as posix\.system\)')),
    'builtins.eval': (_trap(_Eval), REFUSED.replace('{name}', r'builtins\.eval')),
    'subprocess.Popen': (_trap(_Popen), REFUSED.replace('{name}', r'subprocess\.Popen')),
    'any class': (lambda p, g, m: _save(p, dict(g, meta={'x': _Arbitrary()})),
                  REFUSED.replace('{name}', r'[\w.]*_Arbitrary')),
    'raw pickle.dump': (_raw_pickle, REFUSED.replace('{name}', r'os\.system')),
}
ENTRY_POINTS = ('test', 'resume', 'load_from', 'pretrained')


def _good_object(entry: str, det_model) -> dict:
    """A file that the entry point would accept, before it is damaged."""
    if entry == 'pretrained':
        return {'state_dict': {k: v.clone() for k, v in _acmix_backbone().state_dict().items()}}
    return training_checkpoint(det_model.state_dict())


def _acmix_backbone(checkpoint=None):
    init_cfg = None if checkpoint is None else dict(type='Pretrained', checkpoint=str(checkpoint))
    return build_model(dict(type='acmix_mm.ResNetACMix', depth=26, base_channels=16,
                            acmix_stages=(False, False, True, True), init_cfg=init_cfg))


def _enter(entry: str, path: Path, cfg: Config, work_dir: Path) -> None:
    """Run one entry point on checkpoint ``path``; it is expected to raise."""
    cfg = copy.deepcopy(cfg)
    if entry == 'test':
        run_test(cfg, str(path), work_dir=str(work_dir), accelerator='cpu')
    elif entry == 'resume':
        run_train(cfg, work_dir=str(work_dir), resume=str(path), accelerator='cpu', logger=False)
    elif entry == 'load_from':
        cfg.load_from = str(path)
        run_train(cfg, work_dir=str(work_dir), accelerator='cpu', logger=False)
    elif entry == 'pretrained':
        _acmix_backbone(path).init_weights()
    else:
        raise ValueError(entry)


def _check_error(info, path: Path, pattern: str) -> None:
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(pattern.replace('{path}', re.escape(str(path))), message, re.S), message


@pytest.mark.parametrize('entry', ENTRY_POINTS)
@pytest.mark.parametrize('kind', list(KINDS))
def test_bad_file_table(kind, entry, det_cfg, det_model, tmp_path):
    make, pattern = KINDS[kind]
    marker = tmp_path / 'payload_ran'
    path = make(tmp_path / f'{kind.replace(" ", "_")}.ckpt', _good_object(entry, det_model), marker)
    work_dir = tmp_path / 'work'
    with pytest.raises(CheckpointError) as info:
        _enter(entry, path, det_cfg, work_dir)
    _check_error(info, path, pattern)
    assert not marker.exists(), 'the payload ran'
    assert not work_dir.exists(), sorted(work_dir.rglob('*'))


# --------------------------------------------------------------------------- other models
@pytest.fixture(scope='module')
def foreign_files(det_cfg, coco_root, tmp_path_factory) -> Dict[str, Path]:
    """Checkpoints of other models, each laid out as the entry points expect (training checkpoints:
    a wrong model must be the only thing wrong with them)."""
    folder = tmp_path_factory.mktemp('foreign')
    acmix_det = MMLightningModule(acmix_maskrcnn_config(coco_root), init_weights=False).model
    files = {
        'segmentor': training_checkpoint({f'{k}': v for k, v in segmentor_state_dict().items()}),
        'ResNet-50 detector': training_checkpoint(
            {f'backbone.{k}': v for k, v in resnet50_state_dict().items()}),
        'ACMix detector': training_checkpoint(acmix_det.state_dict()),
    }
    out = {name: _save(folder / f'{name.replace(" ", "_")}.ckpt', obj) for name, obj in files.items()}
    # the ResNet-50 as torchvision/mmdet publish it: a bare backbone state_dict
    out['ResNet-50'] = _save(folder / 'resnet50.pth', resnet50_state_dict())
    return out


DOES_NOT_FIT = FILE + r' does not fit {target} \(a checkpoint of another model or configuration\?\): '
# (file, entry) -> (target model, regex after the common start)
SEG_INTO_DET = (r'48 model keys missing from the checkpoint \(roi_head\.\* 20, neck\.\* 16, backbone\.\* 6, '
                r'rpn_head\.\* 6\): backbone\.conv1\.weight, .*; 24 checkpoint keys not in the model '
                r'\(backbone\.\* 18, decode_head\.\* 6\): backbone\.stem\.0\.weight')
ACMIX_INTO_DET = (r'27 model keys missing from the checkpoint \(backbone\.\* 27\): .*; 136 checkpoint keys not '
                  r'in the model \(backbone\.\* 136\)')
R50_INTO_ACMIX = (r'60 model keys missing from the checkpoint \(layer3\.\* 48, layer4\.\* 12\): '
                  r'layer3\.0\.conv2\.rate1, .*; 140 shape mismatches: conv1\.weight: checkpoint \(8, 3, 7, 7\) '
                  r'vs model \(16, 3, 7, 7\)')
# (file, entry) -> (target model, what the message goes on to say)
FOREIGN_ROWS = {
    ('segmentor', 'test'): ('MaskRCNN', SEG_INTO_DET),
    ('segmentor', 'resume'): ('MaskRCNN', SEG_INTO_DET),
    ('segmentor', 'load_from'): ('MaskRCNN', SEG_INTO_DET),
    ('segmentor', 'pretrained'): ('ResNetACMix', r'checkpoint keys not in the model \(stem\.\* 18, '),
    ('ACMix detector', 'test'): ('MaskRCNN', ACMIX_INTO_DET),
    ('ACMix detector', 'resume'): ('MaskRCNN', ACMIX_INTO_DET),
    ('ACMix detector', 'load_from'): ('MaskRCNN', ACMIX_INTO_DET),
    ('ResNet-50 detector', 'test'): ('MaskRCNN', r'42 model keys missing from the checkpoint \(roi_head\.\* 20, '
                                                 r'neck\.\* 16, rpn_head\.\* 6\).*198 checkpoint keys not in the '
                                                 r'model \(backbone\.\* 198\)'),
    ('ResNet-50', 'load_from'): ('MaskRCNN', r'318 checkpoint keys not in the model \(layer3\.\* 114, '),
    # mmdet's ResNet-50 into the ACMix backbone: bare, and inside a whole detector's checkpoint
    ('ResNet-50', 'pretrained'): ('ResNetACMix', R50_INTO_ACMIX),
    ('ResNet-50 detector', 'pretrained'): ('ResNetACMix', R50_INTO_ACMIX),
}


@pytest.mark.parametrize('name, entry', list(FOREIGN_ROWS))
def test_checkpoint_of_another_model(name, entry, foreign_files, det_cfg, tmp_path):
    path = foreign_files[name]
    target, detail = FOREIGN_ROWS[(name, entry)]
    work_dir = tmp_path / 'work'
    with pytest.raises(CheckpointError) as info:
        _enter(entry, path, det_cfg, work_dir)
    prefix = {'resume': '--resume: ', 'load_from': 'load_from: '}.get(entry, '')
    _check_error(info, path, '^' + re.escape(prefix) + DOES_NOT_FIT.replace('{target}', target) + '.*' + detail)
    assert not work_dir.exists()


# --------------------------------------------------------------------------- what resume needs
def test_resume_from_weights_only_checkpoint_says_use_load_from(det_cfg, det_model, tmp_path):
    """An mmdet/mmengine model file (weights + numpy meta) loads with test() and load_from, but
    cannot resume: the message says which keys are missing and what to use instead."""
    path = _save(tmp_path / 'mmdet_model.pth', {
        'state_dict': det_model.state_dict(),
        'meta': {'epoch': np.int64(12), 'iter': np.int64(3000), 'mmdet_version': '3.3.0',
                 'lr': np.float32(0.02), 'hist': np.arange(3)}})
    work_dir = tmp_path / 'work'
    with pytest.raises(CheckpointError) as info:
        _enter('resume', path, det_cfg, work_dir)
    _check_error(info, path, r"^--resume: checkpoint '{path}' is not a training checkpoint of tools/train\.py: "
                             r'it has no optimizer_states, loops, epoch, global_step .*load_from=PATH.*'
                             r'init_cfg=dict\(type="Pretrained"')
    assert not work_dir.exists()
    # The numpy scalars of mmengine's meta are data, not code: the same file is accepted where
    # weights are all that is needed (test() and load_from read it with the same reader).
    checkpoint = load_checkpoint_dict(str(path))
    assert checkpoint['meta']['epoch'] == 12 and checkpoint['meta']['hist'].tolist() == [0, 1, 2]
    fresh = MMLightningModule(det_cfg, init_weights=True).model
    load_model_weights(fresh, str(path), checkpoint)
    for key, value in det_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    start = StartCheckpoint.read(None, str(path))
    other = MMLightningModule(det_cfg, init_weights=True).model
    start.apply(other)
    assert torch.equal(other.state_dict()['roi_head.bbox_head.fc_cls.weight'],
                       det_model.state_dict()['roi_head.bbox_head.fc_cls.weight'])


def test_resume_checkpoint_with_numpy_data_is_refused_before_lightning(det_cfg, det_model, tmp_path):
    """Lightning reads a resumed file with plain weights_only=True, which refuses numpy scalars
    that our reader accepts: the check says so before fit, instead of torch's error inside it."""
    path = _save(tmp_path / 'numpy.ckpt', training_checkpoint(
        det_model.state_dict(), meta={'epoch': np.int64(0)}))
    with pytest.raises(CheckpointError) as info:
        _enter('resume', path, det_cfg, tmp_path / 'work')
    _check_error(info, path, r"^--resume: checkpoint '{path}' holds numpy\.[\w.]*scalar, numpy\.dtype, which "
                             r"Lightning's weights_only loader refuses")
    with pytest.raises(pickle.UnpicklingError, match='numpy'):  # what fit() would have met
        torch.load(path, map_location='cpu', weights_only=True)


def test_good_training_checkpoint_passes_the_resume_checks(det_cfg, det_model, tmp_path):
    path = _save(tmp_path / 'good.ckpt', training_checkpoint(det_model.state_dict()))
    start = StartCheckpoint.read(str(path), load_from=str(tmp_path / 'ignored.pth'))
    assert start.load_from is None and start.ignored_load_from == str(tmp_path / 'ignored.pth')
    start.apply(MMLightningModule(det_cfg, init_weights=False).model)  # fits: no error


def test_load_from_starts_training_from_the_file(det_cfg, tmp_path):
    """load_from through train(): the file's weights (an mmengine-style file with numpy meta)
    replace the initialised ones before the first step. With lr=0 they are still there after it."""
    cfg = copy.deepcopy(det_cfg)
    for key in ('val_dataloader', 'val_evaluator', 'val_cfg'):
        cfg.pop(key)
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.0, momentum=0.0))
    cfg.param_scheduler = []
    torch.manual_seed(123)
    source = MMLightningModule(cfg).model.state_dict()
    cfg.load_from = str(_save(tmp_path / 'pretrained.pth', {'state_dict': source,
                                                             'meta': {'epoch': np.int64(12)}}))
    module = run_train(cfg, work_dir=str(tmp_path / 'work'), accelerator='cpu', logger=False,
                       enable_checkpointing=False)
    assert module.trainer.global_step == 1
    torch.manual_seed(cfg.randomness.seed)
    initialised = MMLightningModule(cfg).model.state_dict()  # what training would start from otherwise
    trained = module.model.state_dict()
    compared = [k for k in source if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(compared) > 100
    for key in compared:
        assert torch.equal(trained[key], source[key]), key
    assert not torch.equal(initialised['backbone.conv1.weight'], source['backbone.conv1.weight'])


def test_missing_files_and_bad_load_from_values(det_cfg, tmp_path):
    nowhere = tmp_path / 'nowhere.ckpt'
    for entry in ENTRY_POINTS:
        with pytest.raises(FileNotFoundError, match=re.escape(str(nowhere))):
            _enter(entry, nowhere, det_cfg, tmp_path / 'work')
    with pytest.raises(FileNotFoundError, match='is a directory'):
        _enter('test', tmp_path, det_cfg, tmp_path / 'work')
    with pytest.raises(TypeError, match=r"load_from=\['a\.pth'\] is a list; expected the path"):
        StartCheckpoint.read(None, ['a.pth'])
    assert not (tmp_path / 'work').exists()


# --------------------------------------------------------------------------- the command line
def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope='module')
def cli_files(det_cfg, det_model, coco_root, tmp_path_factory) -> Dict[str, Path]:
    """Config files and bad checkpoints for the command-line rows."""
    folder = tmp_path_factory.mktemp('cli')
    det_cfg.dump(str(folder / 'det.py'))
    good = training_checkpoint(det_model.state_dict())
    files = {'det.py': folder / 'det.py', 'marker': folder / 'payload_ran',
             'trap.ckpt': _trap(_System)(folder / 'trap.ckpt', good, folder / 'payload_ran'),
             'cut.pth': _cut(folder / 'cut.pth', _save(folder / 'backbone.pth', _acmix_backbone().state_dict()),
                             lambda n: n // 3),
             'segmentor.pth': _save(folder / 'segmentor.pth', {'state_dict': segmentor_state_dict()}),
             'weights.pth': _save(folder / 'weights.pth', {'state_dict': det_model.state_dict(),
                                                           'meta': {'epoch': np.int64(1)}})}
    acmix_cfg = acmix_maskrcnn_config(coco_root)
    acmix_cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(files['cut.pth']))
    acmix_cfg.dump(str(folder / 'acmix.py'))
    files['acmix.py'] = folder / 'acmix.py'
    return files


# entry -> (command line with {file} placeholders, the error's regex with {file} placeholders)
CLI_ROWS = {
    'test': (('tools/test.py', '{det.py}', '{trap.ckpt}'),
             r"CheckpointError: refusing to load checkpoint '{trap.ckpt}': its pickle calls or builds os\.system"),
    'resume': (('tools/train.py', '{det.py}', '--resume', '{weights.pth}'),
               r"CheckpointError: --resume: checkpoint '{weights.pth}' is not a training checkpoint of "
               r'tools/train\.py: it has no optimizer_states, loops, epoch, global_step'),
    'load_from': (('tools/train.py', '{det.py}', '--cfg-options', 'load_from={segmentor.pth}'),
                  r"CheckpointError: load_from: checkpoint '{segmentor.pth}' does not fit MaskRCNN"),
    'pretrained': (('tools/train.py', '{acmix.py}'),
                   r"CheckpointError: checkpoint '{cut.pth}' is truncated or corrupt: a torch\.save zip archive"),
}


@pytest.mark.parametrize('entry', [
    'test', 'resume', pytest.param('load_from', marks=pytest.mark.slow),
    pytest.param('pretrained', marks=pytest.mark.slow)])
def test_cli_rows(entry, cli_files, tmp_path):
    """One row per entry point through tools/test.py and tools/train.py in a fresh interpreter
    (two in the default run; about 7 s of CPU each)."""
    args, pattern = CLI_ROWS[entry]
    for name, path in cli_files.items():
        args = tuple(a.replace('{' + name + '}', str(path)) for a in args)
        pattern = pattern.replace('{' + name + '}', re.escape(str(path)))
    work = tmp_path / 'work'
    proc = subprocess.run([sys.executable, *args, '--work-dir', str(work), '--accelerator', 'cpu'], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, args
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(pattern, last), (args, proc.stderr[-3000:])
    assert not work.exists() and not cli_files['marker'].exists()
