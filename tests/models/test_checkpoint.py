"""Safe checkpoint loading: nothing in a file runs, layouts, key conversion, clear errors, the tool."""
from __future__ import annotations

import builtins
import collections
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from acmix_mm.models.backbones.resnet_acmix import ResNetACMix
from acmix_mm.models.backbones.swin_acmix import SwinACMix
from acmix_mm.checkpoint import (CheckpointError, backbone_state_dict, convert_swin_authors, load_backbone_weights,
                                 safe_load)
from tools.convert_official_ckpt import convert, main as convert_main

SMALL = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


def authors_config() -> CfgNode:
    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    cfg.MODEL.TYPE = 'swin_acmix'
    cfg.MODEL.SWIN = CfgNode()
    cfg.MODEL.SWIN.DEPTHS = [1, 1, 2, 1]
    cfg.TRAIN = CfgNode()
    cfg.TRAIN.BASE_LR = 5e-4
    cfg.freeze()
    return cfg


def authors_file(path, state_dict) -> str:
    """A file laid out as the authors' training script saves it."""
    torch.save({'model': state_dict, 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3}]},
                'lr_scheduler': {'last_epoch': 299}, 'max_accuracy': 81.9, 'epoch': 299,
                'config': authors_config()}, path)
    return str(path)


def authors_swin_state(acmix_stages=(0, 1, 2, 3)) -> 'collections.OrderedDict':
    """Our model's weights renamed back to the authors' layout (head and buffers added)."""
    torch.manual_seed(0)
    model = SwinACMix(SMALL, out_indices=(3,), acmix_stages=acmix_stages)
    model.init_weights()
    state = collections.OrderedDict()
    for k, v in model.state_dict().items():
        k = k.replace('stages.', 'layers.', 1) if k.startswith('stages.') else k
        state['norm.' + k[len('norm3.'):] if k.startswith('norm3.') else k] = v
    state['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
    state['layers.0.blocks.1.attn_mask'] = torch.zeros(64, 49, 49)
    state['head.weight'], state['head.bias'] = torch.randn(10, 128), torch.randn(10)
    return state


# --------------------------------------------------------------------------- reading
def test_authors_file_with_yacs_config_loads_as_plain_data(tmp_path):
    path = authors_file(tmp_path / 'swin.pth', {'w': torch.arange(3.0)})
    with pytest.raises(pickle.UnpicklingError):  # what torch alone does with such a file
        torch.load(path, weights_only=True)
    obj = safe_load(path)
    assert type(obj['config']) is dict and type(obj['config']['MODEL']) is dict
    assert obj['config']['MODEL']['SWIN']['DEPTHS'] == [1, 1, 2, 1]
    assert obj['config']['TRAIN']['BASE_LR'] == 5e-4
    assert obj['epoch'] == 299 and obj['max_accuracy'] == 81.9
    assert torch.equal(obj['model']['w'], torch.arange(3.0))


def test_state_dict_metadata_survives(tmp_path):
    module = torch.nn.BatchNorm2d(2)
    path = authors_file(tmp_path / 'bn.pth', module.state_dict())
    state = safe_load(path)['model']
    assert type(state) is collections.OrderedDict
    assert state._metadata == module.state_dict()._metadata


def test_the_trap_is_armed(tmp_path):
    """The payload used below does run under a plain unpickler (so the tests can fail)."""
    marker = tmp_path / 'armed'
    pickle.loads(pickle.dumps(_System(marker)))
    assert marker.exists()


def test_numpy_metadata_loads(tmp_path):
    path = tmp_path / 'mmengine.pth'
    torch.save({'state_dict': {'w': torch.ones(2)},
                'meta': {'epoch': np.int64(3), 'acc': np.float32(0.5), 'arr': np.arange(4)}}, path)
    meta = safe_load(path)['meta']
    assert meta['epoch'] == 3 and meta['acc'] == np.float32(0.5)
    assert meta['arr'].tolist() == [0, 1, 2, 3]


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (['touch', str(self.marker)],)


class _Arbitrary:
    """An ordinary class: building it is as much code execution as calling os.system."""


@pytest.mark.parametrize('payload, global_name', [
    (_System, 'system'), (_Eval, 'eval'), (_Popen, 'Popen')])
@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_booby_trapped_pickle_is_refused_and_never_runs(tmp_path, payload, global_name, writer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'trap.pth'
    obj = {'model': {'w': torch.ones(1)}, 'config': payload(marker)}
    if writer == 'torch.save':
        torch.save(obj, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload(marker), f)
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    assert str(path) in str(err.value) and global_name in str(err.value)
    assert not marker.exists()
    # ... and through the backbone's Pretrained init, too
    model = SwinACMix(SMALL, out_indices=(3,), init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError, match='refusing'):
        model.init_weights()
    assert not marker.exists()


def test_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / 'class.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'extra': _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match='_Arbitrary'):
        safe_load(path)


def test_truncated_corrupt_and_missing_files(tmp_path):
    good = authors_file(tmp_path / 'good.pth', {'w': torch.randn(100)})
    data = open(good, 'rb').read()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'this is not a checkpoint at all' * 10)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=str(path)):
            safe_load(path)
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        safe_load(tmp_path / 'nowhere.pth')


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'state_dict': sd, 'meta': {'epoch': 1}},
    lambda sd: {'model': sd, 'epoch': 3},
    lambda sd: {'state_dict': {'model.' + k: v for k, v in sd.items()}},  # Lightning
    lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}},  # DataParallel
])
def test_backbone_state_dict_layouts(wrap):
    sd = collections.OrderedDict(a=torch.ones(1), b=torch.zeros(2))
    out = backbone_state_dict(wrap(sd))
    assert list(out) == ['a', 'b'] and torch.equal(out['b'], torch.zeros(2))


def test_whole_detector_keeps_backbone_only():
    from acmix_mm.checkpoint import LoadReport
    report = LoadReport()
    sd = {'model.backbone.a': torch.ones(1), 'model.neck.b': torch.ones(1)}
    out = backbone_state_dict({'state_dict': sd}, report=report)
    assert list(out) == ['a'] and report.dropped == [('neck.b', 'outside backbone')]


def test_no_state_dict_is_an_error():
    with pytest.raises(CheckpointError, match="top-level keys are \\['epoch', 'optimizer'\\]"):
        backbone_state_dict({'optimizer': {}, 'epoch': 1}, 'x.pth')
    with pytest.raises(CheckpointError, match='holds a list'):
        backbone_state_dict([1, 2], 'x.pth')


def test_convert_swin_authors_keys():
    state = authors_swin_state()
    out, report = convert_swin_authors(state)
    assert 'stages.2.blocks.1.attn.dep_conv.weight' in out
    assert 'stages.0.downsample.reduction.weight' in out and 'norm3.weight' in out
    assert not any(k.startswith(('layers.', 'head.', 'norm.')) for k in out)
    assert not any(k.endswith(('attn_mask', 'relative_position_index')) for k in out)
    reasons = collections.Counter(r for _, r in report.dropped)
    assert reasons == {'classifier': 2, 'recomputed buffer': 2}
    assert ('norm.bias', 'norm3.bias') in report.converted


# --------------------------------------------------------------------------- loading
def test_authors_file_loads_with_report(tmp_path):
    state = authors_swin_state()
    path = authors_file(tmp_path / 'swin.pth', state)
    model = SwinACMix(SMALL, out_indices=(1, 3))
    model.init_weights()
    report = model.load_pretrained(path)
    assert report.missing == ['norm1.weight', 'norm1.bias']  # not in the authors' file
    assert report.loaded == len(model.state_dict()) - 2
    assert torch.equal(model.stages[2].blocks[1].attn.fc.weight,
                       state['layers.2.blocks.1.attn.fc.weight'])
    assert torch.equal(model.norm3.weight, state['norm.weight'])


def test_final_norm_dropped_when_last_stage_not_returned(tmp_path):
    path = authors_file(tmp_path / 'swin.pth', authors_swin_state())
    model = SwinACMix(SMALL, out_indices=(0, 1))
    report = model.load_pretrained(path)
    assert ('norm.weight', 'final norm (last stage not in out_indices)') in [
        (k.replace('norm3', 'norm'), r) for k, r in report.dropped]
    assert sorted(report.missing) == ['norm0.bias', 'norm0.weight', 'norm1.bias', 'norm1.weight']


def test_other_architecture_is_refused_naming_keys(tmp_path):
    # plain Swin (no ACMix) weights: the conv-branch keys are missing
    plain = authors_file(tmp_path / 'plain.pth', authors_swin_state(acmix_stages=()))
    with pytest.raises(CheckpointError, match=r'25 model keys missing from the checkpoint \(stages\.\* 25\): stages\.0\.blocks\.0\.attn\.rate1'):
        SwinACMix(SMALL, out_indices=(3,)).load_pretrained(plain)
    # another width: shapes differ
    with pytest.raises(CheckpointError, match=r'patch_embed\.proj\.weight: checkpoint \(16, 3, 4, 4\) vs model '
                                              r'\(32, 3, 4, 4\)'):
        SwinACMix(dict(SMALL, embed_dims=32), out_indices=(3,)).load_pretrained(plain)
    # a ResNet file into the Swin backbone: unexpected keys named
    resnet = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.ones(1), 'layer1.0.bn1.weight': torch.ones(1)}, resnet)
    with pytest.raises(CheckpointError, match=r'2 checkpoint keys not in the model \(conv1\.\* 1, layer1\.\* 1\): '
                                              r'conv1\.weight, layer1\.0\.bn1\.weight'):
        SwinACMix(SMALL, out_indices=(3,)).load_pretrained(str(resnet))


def test_resnet_authors_layout_drops_classifier(tmp_path):
    torch.manual_seed(0)
    src = ResNetACMix(depth=26, base_channels=16)
    src.init_weights()
    state = dict(src.state_dict(), **{'fc.weight': torch.randn(1000, 512), 'fc.bias': torch.randn(1000)})
    path = authors_file(tmp_path / 'resnet.pth', state)
    torch.manual_seed(1)
    dst = ResNetACMix(depth=26, base_channels=16)
    report = load_backbone_weights(dst, path, drop_prefixes=('fc.',))
    assert sorted(k for k, _ in report.dropped) == ['fc.bias', 'fc.weight']
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match=r'not in the model \(fc\.\* 2\): fc\.weight, fc\.bias'):
        load_backbone_weights(ResNetACMix(depth=26, base_channels=16), path)


# --------------------------------------------------------------------------- the tool
def test_convert_tool(tmp_path):
    state = authors_swin_state()
    src = authors_file(tmp_path / 'swin.pth', state)
    dst = tmp_path / 'converted.pth'
    assert convert_main([src, str(dst)]) == 0
    out = torch.load(dst, weights_only=True)  # plain tensors only
    assert 'stages.3.blocks.0.attn.fc.bias' in out and 'head.weight' not in out
    assert torch.equal(out['norm3.weight'], state['norm.weight'])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []
    # mmengine's default loader takes the converted file as it is
    from mmengine.runner import load_checkpoint
    model = SwinACMix(SMALL, out_indices=(3,))
    load_checkpoint(model, str(dst), strict=True)
    assert torch.equal(model.stages[0].blocks[0].attn.qkv.weight, state['layers.0.blocks.0.attn.qkv.weight'])
    # --prefix for load_from
    convert(src, str(tmp_path / 'prefixed.pth'), prefix='backbone.')
    assert all(k.startswith('backbone.') for k in torch.load(tmp_path / 'prefixed.pth'))


def test_convert_tool_failure_leaves_dst_alone(tmp_path, capsys):
    dst = tmp_path / 'dst.pth'
    dst.write_bytes(b'previous contents')
    trap = tmp_path / 'trap.pth'
    torch.save({'x': _System(tmp_path / 'pwned')}, trap)
    assert convert_main([str(trap), str(dst)]) == 1
    assert 'refusing' in capsys.readouterr().err
    assert dst.read_bytes() == b'previous contents' and not (tmp_path / 'pwned').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dst.pth', 'trap.pth']
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        convert(str(tmp_path / 'missing.pth'), str(dst))


# --------------------------------------------------------------------------- mmengine Runner files
def test_mmengine_runner_checkpoint_loads_as_plain_data(tmp_path):
    """A checkpoint written by mmengine's own Runner (what mmdet/mmseg tools/train.py write) holds
    HistoryBuffer objects in its message_hub and numpy scalars; it reads as plain data."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 1)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            out = self.fc(torch.stack(inputs) if isinstance(inputs, list) else inputs)
            return {'loss': out.pow(2).mean()} if mode == 'loss' else out

    torch.manual_seed(0)
    runner = Runner(model=Toy(), work_dir=str(tmp_path / 'work'), default_scope='mmengine',
                    train_dataloader=dict(dataset=[dict(inputs=torch.randn(2)) for _ in range(4)],
                                          sampler=dict(type='DefaultSampler', shuffle=False), batch_size=2,
                                          collate_fn=dict(type='default_collate')),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
                    train_cfg=dict(by_epoch=True, max_epochs=1),
                    default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)))
    runner.train()
    path = tmp_path / 'work' / 'epoch_1.pth'
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):  # torch alone refuses it
        torch.load(path, weights_only=True)
    obj = safe_load(path)
    assert obj['meta']['epoch'] == 1 and obj['meta']['iter'] == 2
    loss = obj['message_hub']['log_scalars']['train/loss']
    assert loss['__class__'] == 'mmengine.logging.history_buffer.HistoryBuffer'
    assert loss['_log_history'].shape == (2,) and loss['_count_history'].tolist() == [1, 1]
    assert loss['statistics_methods']['mean'] == '<mmengine.logging.history_buffer.HistoryBuffer.mean>'
    for key, value in runner.model.state_dict().items():
        assert torch.equal(obj['state_dict'][key], value), key


class _GetattrOnTensor:
    """Pickles as getattr(torch.Tensor, '__setattr__'): an allowed class, an attribute lookup."""

    def __reduce__(self):
        return getattr, (torch.Tensor, '__setattr__')


def test_getattr_is_allowed_on_inert_objects_only(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': _GetattrOnTensor()}, path)
    with pytest.raises(CheckpointError, match=r'builtins\.getattr.*reads attributes of '
                                              r'mmengine\.logging\.history_buffer\.HistoryBuffer objects only, '
                                              r'not of a _TensorMeta'):
        safe_load(path)
