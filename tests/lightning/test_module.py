"""Unit-level behaviour of the wrapper: device following, SyncBN fallback, precision/accumulation
mapping, plain-data checkpoints, gradient clipping."""
import collections
import warnings

import numpy as np
import pytest
import torch
from mmengine.config import Config

from acmix_mm.lightning import MMLightningModule, RunSpec, TrainerOverrides, build_trainer, to_plain, train
from acmix_mm.lightning.optim import clip_gradients
from acmix_mm.lightning.spec import OptimSettings

from .helpers import tiny_maskrcnn_config


def test_data_preprocessor_follows_module_device(coco_root):
    module = MMLightningModule(tiny_maskrcnn_config(coco_root), init_weights=False)
    assert module.model.data_preprocessor.device == torch.device('cpu')
    # Lightning moves the LightningModule; its children only see _apply. 'meta' stands in for a GPU.
    module.to(torch.device('meta'))
    assert module.model.data_preprocessor.device == torch.device('meta')
    assert module.model.data_preprocessor.mean.device == torch.device('meta')


def test_sync_bn_reverts_to_bn_on_one_process(coco_root, tmp_path):
    cfg = tiny_maskrcnn_config(coco_root, max_iters=1, work_dir=tmp_path / 'w')
    cfg.model.backbone.norm_cfg = dict(type='SyncBN', requires_grad=True)
    cfg.pop('val_dataloader')
    cfg.pop('val_evaluator')
    module = MMLightningModule(cfg)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
    module = train(cfg, accelerator='cpu', logger=False, enable_checkpointing=False)
    assert module.trainer.global_step == 1
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.model.backbone.modules())


@pytest.mark.parametrize('optim, precision', [
    (dict(type='OptimWrapper'), None),
    (dict(type='AmpOptimWrapper'), '16-mixed'),
    (dict(type='AmpOptimWrapper', dtype='bfloat16'), 'bf16-mixed'),
])
def test_optim_settings_precision(optim, precision):
    assert OptimSettings.from_config(dict(optim, optimizer=dict(type='SGD', lr=0.1))).precision == precision


def test_trainer_from_config_amp_accumulation_and_iter_loop(coco_root, tmp_path):
    cfg = tiny_maskrcnn_config(coco_root, max_iters=5)
    cfg.optim_wrapper = dict(type='AmpOptimWrapper', optimizer=dict(type='SGD', lr=0.1), accumulative_counts=2,
                             clip_grad=dict(max_norm=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = build_trainer(RunSpec.from_config(cfg, work_dir=str(tmp_path)), accelerator='cpu')
    # float16 AMP is GPU-only in Lightning: on CPU it becomes bf16 with a warning.
    assert any('bf16-mixed' in str(w.message) for w in caught)
    assert trainer.precision == 'bf16-mixed'
    assert trainer.accumulate_grad_batches == 2
    assert trainer.max_steps == 5  # an upper bound; the module stops after 5 batches
    assert trainer.val_check_interval == 5 and trainer.check_val_every_n_epoch is None
    epoch_cfg = tiny_maskrcnn_config(coco_root, max_epochs=4)
    epoch_cfg.train_cfg.val_interval = 2
    trainer = build_trainer(RunSpec.from_config(epoch_cfg, work_dir=str(tmp_path)), accelerator='cpu',
                            precision='32-true')
    assert trainer.max_epochs == 4 and trainer.check_val_every_n_epoch == 2
    with pytest.raises(ValueError, match="precision='8-bit'"):
        RunSpec.from_config(epoch_cfg, work_dir=str(tmp_path), overrides=TrainerOverrides(precision='8-bit'))




def test_to_plain_makes_weights_only_loadable(tmp_path):
    value = {'metric': np.float64(0.25), 'count': np.int64(3), 'array': np.arange(3),
             'milestones': collections.Counter({8: 1, 11: 1}), 'cfg': Config(dict(a=dict(b=(1, 2)))),
             'nested': [np.float32(1.5), {'x': np.bool_(True)}]}
    plain = to_plain(value)
    path = tmp_path / 'x.pt'
    torch.save(plain, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['metric'] == 0.25 and type(loaded['metric']) is float
    assert loaded['count'] == 3 and type(loaded['count']) is int
    assert torch.equal(loaded['array'], torch.arange(3))
    assert loaded['milestones'] == {8: 1, 11: 1}
    assert loaded['cfg'] == {'a': {'b': (1, 2)}}
    assert loaded['nested'] == [1.5, {'x': True}]


@pytest.mark.parametrize('clip, expected_norm', [
    (dict(max_norm=1.0, norm_type=1), 7.0),   # |3| + |4| = 7
    (dict(max_norm=1.0), 5.0),                # sqrt(9 + 16)
])
def test_clip_gradients_uses_norm_type(clip, expected_norm):
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    optimizer = torch.optim.SGD([param], lr=0.1)
    norm = clip_gradients(optimizer, clip)
    assert float(norm) == pytest.approx(expected_norm)
    p = clip.get('norm_type', 2)
    assert float(param.grad.abs().pow(p).sum().pow(1 / p)) == pytest.approx(1.0, rel=1e-5)


def test_clip_gradients_by_value():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, -0.5])
    assert clip_gradients(torch.optim.SGD([param], lr=0.1), dict(type='value', clip_value=1.0)) is None
    assert param.grad.tolist() == [1.0, -0.5]


def test_datamodule_honours_batch_sampler_and_unpadded_eval(coco_root):
    from mmdet.datasets.samplers import AspectRatioBatchSampler
    from mmengine.dataset import DefaultSampler

    from acmix_mm.lightning import MMDataModule

    cfg = tiny_maskrcnn_config(coco_root)
    cfg.train_dataloader.batch_sampler = dict(type='AspectRatioBatchSampler')
    datamodule = MMDataModule(cfg)
    datamodule.setup('fit')
    loader = datamodule.train_dataloader()
    assert isinstance(loader.batch_sampler, AspectRatioBatchSampler)
    batches = list(loader)
    assert [len(b['data_samples']) for b in batches] == [2, 2]
    val = datamodule.val_dataloader()
    assert isinstance(val.sampler, DefaultSampler) and val.sampler.round_up is False
    assert sum(len(b['data_samples']) for b in val) == 5
    assert datamodule.evaluator('val').dataset_meta['classes'] == ('square', 'bar')
