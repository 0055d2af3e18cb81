"""Semantic segmentation through the generic Lightning wrapper (mmseg EncoderDecoder + ADE20K layout).

One tiny ADE20K-layout set (acmix_mm.datasets.synthetic, 5 validation images: an odd count, so
that padded distributed evaluation would show) and the demo config shrunk to it. The model is
trained for 2 steps by tools/train.py once per session; everything else evaluates that checkpoint.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config, ConfigDict
from PIL import Image

from acmix_mm.datasets.synthetic import ADE_CLASSES, generate_ade_scenes
from acmix_mm.lightning import MMDataModule, MMLightningModule
from acmix_mm.checkpoint import load_model_weights

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs' / 'demo' / 'semfpn_acmix-r26-slim_shapes-ade.py'
NUM_VAL = 5
IMAGE_SIZE = (64, 64)
NUM_CLASSES = len(ADE_CLASSES)


def run_tool(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


def seg_config(data_root: Path) -> Config:
    """The demo config on ``data_root`` at test sizes (64x64 images, 48x48 crops, 2 steps)."""
    cfg = Config.fromfile(str(DEMO_CONFIG))
    cfg.model.data_preprocessor.size = (48, 48)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = str(data_root)
        cfg[key].num_workers = 0
        for step in cfg[key].dataset.pipeline:
            if step['type'] in ('Resize', 'RandomResize'):
                step['scale'] = IMAGE_SIZE
            if step['type'] == 'RandomCrop':
                step['crop_size'] = (48, 48)
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2)
    cfg.param_scheduler = []
    cfg.lightning = dict(enable_progress_bar=False, loggers=[])
    return cfg


def dump(cfg: Config, path: Path) -> Path:
    cfg.dump(str(path))
    return path


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    return generate_ade_scenes(tmp_path_factory.mktemp('ade') / 'shapes', num_train=4, num_val=NUM_VAL,
                               size=IMAGE_SIZE)


@pytest.fixture(scope='module')
def seg_config_file(ade_root, tmp_path_factory) -> Path:
    return dump(seg_config(ade_root), tmp_path_factory.mktemp('cfg') / 'seg.py')


@pytest.fixture(scope='module')
def seg_checkpoint(seg_config_file, tmp_path_factory) -> Path:
    """A checkpoint of 2 training steps by tools/train.py."""
    work_dir = tmp_path_factory.mktemp('work')
    run_tool('tools/train.py', seg_config_file, '--work-dir', work_dir, '--accelerator', 'cpu')
    return work_dir / 'checkpoints' / 'last.ckpt'


def printed_metric(stdout: str, name: str) -> float:
    """The value of ``name`` in tools/test.py's metric table (a line 'name  value')."""
    match = re.search(rf'^{re.escape(name)}\s+([-\d.]+)\s*$', stdout, re.MULTILINE)
    assert match, f'no {name} line in:\n{stdout[-2000:]}'
    return float(match.group(1))


def numpy_iou_metrics(pred_dir: Path, gt_dir: Path, num_classes: int) -> dict:
    """aAcc/mIoU/mAcc (percent) from ADE-convention PNGs: stored k = class k - 1, 0 = ignore."""
    intersect = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_gt = np.zeros(num_classes)
    for gt_path in sorted(gt_dir.glob('*.png')):
        gt = np.asarray(Image.open(gt_path)).astype(np.int64) - 1
        pred = np.asarray(Image.open(pred_dir / gt_path.name)).astype(np.int64) - 1
        assert pred.shape == gt.shape, gt_path.name
        valid = (gt >= 0) & (gt < num_classes)
        gt, pred = gt[valid], pred[valid]
        intersect += np.bincount(gt[pred == gt], minlength=num_classes)[:num_classes]
        area_pred += np.bincount(pred, minlength=num_classes)[:num_classes]
        area_gt += np.bincount(gt, minlength=num_classes)[:num_classes]
    union = area_pred + area_gt - intersect
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = intersect / union
        acc = intersect / area_gt
    return dict(aAcc=100 * intersect.sum() / area_gt.sum(), mIoU=100 * np.nanmean(iou),
                mAcc=100 * np.nanmean(acc))


# -- training and testing through tools/ ----------------------------------------------------------
def test_train_writes_mmseg_checkpoint(seg_checkpoint):
    ckpt = torch.load(seg_checkpoint, map_location='cpu', weights_only=True)
    assert ckpt['global_step'] == 2
    assert list(ckpt['meta']['dataset_meta']['classes']) == list(ADE_CLASSES)
    # the decode head's classifier has one output per class
    assert ckpt['state_dict']['decode_head.conv_seg.weight'].shape[0] == NUM_CLASSES


def test_out_pngs_reproduce_printed_miou(seg_config_file, seg_checkpoint, ade_root, tmp_path):
    out = tmp_path / 'pred'
    work_dir = tmp_path / 'work'
    proc = run_tool('tools/test.py', seg_config_file, seg_checkpoint, '--out', out, '--work-dir', work_dir,
                    '--accelerator', 'cpu')
    gt_dir = ade_root / 'annotations' / 'validation'
    # one PNG per image, named by the image's stem, at the image's size, in ADE's convention
    assert sorted(p.name for p in out.glob('*.png')) == sorted(p.name for p in gt_dir.glob('*.png'))
    for png in out.glob('*.png'):
        pred = np.asarray(Image.open(png))
        assert pred.shape == IMAGE_SIZE and pred.dtype == np.uint8
        assert pred.min() >= 1 and pred.max() <= NUM_CLASSES  # class index + 1; never "ignore"
    expected = numpy_iou_metrics(out, gt_dir, NUM_CLASSES)
    for name in ('aAcc', 'mIoU', 'mAcc'):
        assert printed_metric(proc.stdout, name) == pytest.approx(expected[name], abs=0.006), name
    written = json.loads(next(work_dir.glob('metrics_*.json')).read_text())
    assert written['mIoU'] == pytest.approx(expected['mIoU'], abs=0.006)
    # mmseg's IoUMetric prints the per-class table through mmengine's logger, also into the work dir
    logged = next(work_dir.glob('test_*.log')).read_text()
    for text in (proc.stdout + proc.stderr, logged):
        assert 'per class results' in text
        for name in ADE_CLASSES:
            assert re.search(rf'\|\s*{name}\s*\|', text), name


def test_ddp_two_processes_count_each_image_once(seg_config_file, seg_checkpoint, tmp_path):
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f'pred{devices}'
        args = ['tools/test.py', seg_config_file, seg_checkpoint, '--out', out, '--work-dir',
                tmp_path / f'work{devices}', '--accelerator', 'cpu', '--devices', devices]
        if devices == 2:
            args += ['--strategy', 'ddp']
        proc = run_tool(*args)
        outs[devices] = (proc.stdout, out)
    for name in ('aAcc', 'mIoU', 'mAcc'):
        assert printed_metric(outs[2][0], name) == printed_metric(outs[1][0], name), name
    # each of the 5 images predicted once, identically in both runs
    names = sorted(p.name for p in outs[1][1].glob('*.png'))
    assert len(names) == NUM_VAL
    assert sorted(p.name for p in outs[2][1].glob('*.png')) == names
    for name in names:
        np.testing.assert_array_equal(np.asarray(Image.open(outs[1][1] / name)),
                                      np.asarray(Image.open(outs[2][1] / name)))


# -- the wrapper's module on an mmseg EncoderDecoder ----------------------------------------------
def _module_and_batch(cfg: Config, checkpoint: Path, split: str = 'test'):
    module = MMLightningModule(cfg, init_weights=False)
    load_model_weights(module.model, str(checkpoint))
    data = MMDataModule(cfg)
    data.setup({'train': 'fit', 'test': 'test'}[split])
    loader = data.build_dataloader(split)
    return module.eval(), next(iter(loader))


def test_loss_step_through_module(ade_root, seg_checkpoint):
    cfg = seg_config(ade_root)
    module, batch = _module_and_batch(cfg, seg_checkpoint, 'train')
    module.train()
    data = module.model.data_preprocessor(batch, True)
    # size=(48, 48): every training batch is padded to the crop size, labels with 255
    assert tuple(data['inputs'].shape) == (2, 3, 48, 48)
    losses = module._run_forward(data, mode='loss')
    assert set(losses) >= {'decode.loss_ce', 'decode.acc_seg'}
    loss, _ = module.model.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    # The demo config puts ACMix in stages 3-4: the gradient reaches the first ACMix layer's fc.
    grad = module.model.backbone.layer3[0].conv2.fc.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def _slide_logits_by_hand(model, inputs: torch.Tensor, meta: dict, crop: int, stride: int) -> torch.Tensor:
    """Average of encode_decode over overlapping crop windows (mmseg's slide inference, restated)."""
    _, _, height, width = inputs.shape
    total = torch.zeros(1, NUM_CLASSES, height, width)
    count = torch.zeros(1, 1, height, width)
    for top in sorted({min(y, height - crop) for y in range(0, height - crop + stride, stride)}):
        for left in sorted({min(x, width - crop) for x in range(0, width - crop + stride, stride)}):
            window = inputs[:, :, top:top + crop, left:left + crop]
            logits = model.encode_decode(window, [dict(meta, img_shape=window.shape[2:])])
            total[:, :, top:top + crop, left:left + crop] += logits
            count[:, :, top:top + crop, left:left + crop] += 1
    assert (count > 0).all()
    return total / count


def test_slide_inference_through_module(ade_root, seg_checkpoint):
    cfg = seg_config(ade_root)
    cfg.model.test_cfg = dict(mode='slide', crop_size=(48, 48), stride=(32, 32))
    cfg.test_dataloader.batch_size = 1
    module, batch = _module_and_batch(cfg, seg_checkpoint)
    with torch.no_grad():
        samples = module.model.test_step(batch)
        data = module.model.data_preprocessor(batch, False)
        meta = samples[0].metainfo
        by_hand = _slide_logits_by_hand(module.model, data['inputs'], meta, crop=48, stride=32)
    logits = samples[0].seg_logits.data
    assert tuple(logits.shape) == (NUM_CLASSES, *IMAGE_SIZE)
    torch.testing.assert_close(logits, by_hand[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(samples[0].pred_sem_seg.data[0].numpy(), by_hand[0].argmax(0).numpy())
    # a window covering the whole image is whole-image inference
    module.model.test_cfg = ConfigDict(mode='whole')
    with torch.no_grad():
        whole = module.model.test_step(batch)[0].seg_logits.data
    module.model.test_cfg = ConfigDict(mode='slide', crop_size=(64, 64), stride=(64, 64))
    with torch.no_grad():
        one_window = module.model.test_step(batch)[0].seg_logits.data
    torch.testing.assert_close(one_window, whole, rtol=1e-5, atol=1e-5)


def test_slide_mode_through_tools_test(seg_config_file, seg_checkpoint, tmp_path):
    proc = run_tool('tools/test.py', seg_config_file, seg_checkpoint, '--work-dir', tmp_path, '--accelerator',
                    'cpu', '--cfg-options', "model.test_cfg.mode=slide", 'model.test_cfg.crop_size=(48,48)',
                    'model.test_cfg.stride=(32,32)', '--out', tmp_path / 'pred')
    assert 0 <= printed_metric(proc.stdout, 'mIoU') <= 100
    assert len(list((tmp_path / 'pred').glob('*.png'))) == NUM_VAL
