"""Bad inputs fail early with a message naming the bad value, and leave no output behind."""
import copy

import pytest
import torch

from acmix_mm.lightning import MMLightningModule, NonFiniteLossError, train
from acmix_mm.checkpoint import load_model_weights

from .helpers import tiny_maskrcnn_config


@pytest.fixture
def cfg(coco_root, tmp_path):
    return tiny_maskrcnn_config(coco_root, max_iters=2, work_dir=tmp_path / 'work')


def _assert_no_output(tmp_path):
    assert not (tmp_path / 'work').exists()


def test_missing_ann_file(cfg, tmp_path):
    cfg.train_dataloader.dataset.ann_file = 'annotations/instances_nope.json'
    with pytest.raises(FileNotFoundError, match=r"train_dataloader\.dataset\.ann_file='annotations/instances_nope\.json'"):
        train(cfg, accelerator='cpu')
    _assert_no_output(tmp_path)


def test_missing_image_folder(cfg, tmp_path):
    cfg.val_dataloader.dataset.data_prefix = dict(img='no_such_images/')
    with pytest.raises(FileNotFoundError, match=r"val_dataloader\.dataset\.data_prefix\.img='no_such_images/'"):
        train(cfg, accelerator='cpu')
    _assert_no_output(tmp_path)


def test_validation_without_val_evaluator(cfg, tmp_path):
    cfg.pop('val_evaluator')
    with pytest.raises(ValueError, match='no val_evaluator'):
        train(cfg, accelerator='cpu')
    _assert_no_output(tmp_path)


def test_unknown_model_type(cfg, tmp_path):
    cfg.model.type = 'MaskRCNNN'
    with pytest.raises(KeyError, match=r"MaskRCNNN is not in the mmdet::model registry.*acmix_mm registers these model types"):
        train(cfg, accelerator='cpu')
    _assert_no_output(tmp_path)


def test_unknown_lightning_key_and_bad_policy(cfg):
    bad = copy.deepcopy(cfg)
    bad.lightning = dict(devcies=2)
    with pytest.raises(ValueError, match="devcies"):
        train(bad, accelerator='cpu')
    bad = copy.deepcopy(cfg)
    bad.lightning = dict(nan_policy='ignore')
    with pytest.raises(ValueError, match="nan_policy='ignore'"):
        MMLightningModule(bad)


def test_checkpoint_of_another_architecture(cfg, tmp_path):
    other = copy.deepcopy(cfg)
    other.model.roi_head.bbox_head.fc_out_channels = 48
    other.model.roi_head.mask_head.num_classes = 5
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': MMLightningModule(other, init_weights=False).model.state_dict()}, path)
    module = MMLightningModule(cfg, init_weights=False)
    before = copy.deepcopy(module.model.state_dict())
    with pytest.raises(ValueError) as info:
        load_model_weights(module.model, str(path))
    message = str(info.value)
    assert 'shape mismatches' in message
    assert 'roi_head.bbox_head.shared_fcs.0.weight: checkpoint (48, 784) vs model (32, 784)' in message
    assert 'roi_head.mask_head.conv_logits.weight: checkpoint (5, 16, 1, 1) vs model (2, 16, 1, 1)' in message
    # Nothing was loaded.
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_missing_checkpoint_file(cfg, tmp_path):
    module = MMLightningModule(cfg, init_weights=False)
    with pytest.raises(FileNotFoundError, match='nope.ckpt'):
        load_model_weights(module.model, str(tmp_path / 'nope.ckpt'))


def _nan_cfg(cfg):
    cfg.model.rpn_head.loss_cls.loss_weight = float('nan')
    cfg.pop('val_dataloader')
    cfg.pop('val_evaluator')
    return cfg


def test_nan_loss_stops_naming_the_step(cfg, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r'training step 0 \(epoch 0, batch 0\).*loss_rpn_cls=nan'):
        train(_nan_cfg(cfg), accelerator='cpu', logger=False)
    assert not list((tmp_path / 'work').glob('checkpoints/*.ckpt'))


def test_nan_loss_skip_policy_leaves_weights_untouched(cfg, tmp_path):
    cfg = _nan_cfg(cfg)
    cfg.lightning.nan_policy = 'skip'
    module = train(cfg, accelerator='cpu', logger=False, enable_checkpointing=False)
    # Lightning still counts the skipped steps, so the loop ends at max_steps as configured.
    assert module.trainer.global_step == 2
    torch.manual_seed(cfg.randomness.seed)
    fresh = MMLightningModule(cfg)
    for key, value in fresh.model.state_dict().items():
        if 'num_batches_tracked' in key or 'running_' in key:
            continue  # BN statistics update in the forward pass
        assert torch.equal(module.model.state_dict()[key], value), key
