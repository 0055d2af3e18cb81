"""Bad segmentation data fails with an error naming the file and the value, through MMDataModule.

Covers acmix_mm.CheckSegMapSize / CheckSegLabels (in the demo config's pipelines) and the folder
checks of acmix_mm.ADE20KLayoutDataset and of the data module.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from acmix_mm.datasets import ADE20KLayoutDataset, CheckSegLabels
from acmix_mm.datasets.synthetic import ADE_CLASSES, generate_ade_scenes
from acmix_mm.lightning import MMDataModule

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs' / 'demo' / 'semfpn_acmix-r26-slim_shapes-ade.py'
SIZE = (48, 64)  # H, W: not square, so that a transposed label map is caught too


@pytest.fixture(scope='module')
def clean_root(tmp_path_factory) -> Path:
    return generate_ade_scenes(tmp_path_factory.mktemp('ade') / 'clean', num_train=2, num_val=3, size=SIZE)


@pytest.fixture
def ade_root(clean_root, tmp_path) -> Path:
    """A fresh copy for a test to break."""
    return Path(shutil.copytree(clean_root, tmp_path / 'ade'))


def config(root: Path) -> Config:
    cfg = Config.fromfile(str(DEMO_CONFIG))
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = str(root)
        cfg[key].num_workers = 0
    return cfg


def load_all(root: Path, split: str) -> list:
    """Every sample of ``split`` through the config's pipeline, via the wrapper's data module."""
    data = MMDataModule(config(root))
    data.setup('fit' if split == 'train' else 'test')
    dataset = data.datasets[split]
    return [dataset[i] for i in range(len(dataset))]


def label_path(root: Path, split: str, index: int = 0) -> Path:
    folder = 'training' if split == 'train' else 'validation'
    return sorted((root / 'annotations' / folder).glob('*.png'))[index]


def test_clean_data_loads_with_reduce_zero_label(clean_root):
    samples = load_all(clean_root, 'test')
    assert len(samples) == 3
    stored = np.asarray(Image.open(label_path(clean_root, 'test', 0)))
    loaded = samples[0]['data_samples'].gt_sem_seg.data[0].numpy()
    # ADE20K convention: stored 0 -> 255 (ignored), stored k -> class k - 1
    expected = np.where(stored == 0, 255, stored.astype(np.int64) - 1)
    np.testing.assert_array_equal(loaded, expected)
    assert set(np.unique(stored)) - {0} <= set(range(1, len(ADE_CLASSES) + 1))
    assert samples[0]['data_samples'].metainfo['reduce_zero_label'] is True


@pytest.mark.parametrize('split', ['train', 'test'])
def test_label_size_differs_from_image(ade_root, split):
    path = label_path(ade_root, split, 1)
    label = np.asarray(Image.open(path))
    Image.fromarray(np.ascontiguousarray(label[:, :40])).save(path)  # 48x40 label for a 48x64 image
    with pytest.raises(ValueError, match=r'\(48, 40\)') as err:
        load_all(ade_root, split)
    assert str(path) in str(err.value) and '48x64' in str(err.value)


@pytest.mark.parametrize('split', ['train', 'test'])
def test_label_value_outside_classes(ade_root, split):
    path = label_path(ade_root, split, 0)
    label = np.asarray(Image.open(path)).copy()
    label[5:9, 5:9] = 9  # classes are stored as 1..5
    Image.fromarray(label).save(path)
    with pytest.raises(ValueError) as err:
        load_all(ade_root, split)
    message = str(err.value)
    assert str(path) in message
    # loaded value 8 (after reduce_zero_label), stored value 9, in 16 pixels
    assert re.search(r'value\(s\) \[8\] in 16 pixel', message), message
    assert 'stored values [9]' in message and '0..4' in message


def test_ignore_values_are_accepted(ade_root):
    path = label_path(ade_root, 'test', 2)
    label = np.asarray(Image.open(path)).copy()
    label[:4] = 0
    label[-4:] = 255  # also "ignore" under reduce_zero_label (255 - 1 -> 254 -> 255)
    Image.fromarray(label).save(path)
    samples = load_all(ade_root, 'test')
    loaded = samples[2]['data_samples'].gt_sem_seg.data[0].numpy()
    assert (loaded[:4] == 255).all() and (loaded[-4:] == 255).all()


@pytest.mark.parametrize('folder', ['images/validation', 'annotations/validation'])
def test_missing_folder(ade_root, folder):
    shutil.rmtree(ade_root / folder)
    with pytest.raises(FileNotFoundError, match=re.escape(folder)):
        MMDataModule(config(ade_root)).setup('test')
    # the dataset checks it too, when built without the data module
    cfg = config(ade_root).test_dataloader.dataset
    with pytest.raises(FileNotFoundError, match=re.escape(str(ade_root / folder))):
        ADE20KLayoutDataset(data_root=cfg.data_root, data_prefix=cfg.data_prefix, metainfo=cfg.metainfo,
                            pipeline=[])


def test_missing_label_png(ade_root):
    path = label_path(ade_root, 'test', 1)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        MMDataModule(config(ade_root)).setup('test')


def test_empty_image_folder(ade_root):
    for image in (ade_root / 'images' / 'validation').iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match=r'no "\*\.jpg" images'):
        MMDataModule(config(ade_root)).setup('test')


def test_dataset_classes_name_stored_labels_without_remapping(clean_root):
    dataset = ADE20KLayoutDataset(data_root=str(clean_root),
                                  data_prefix=dict(img_path='images/validation',
                                                   seg_map_path='annotations/validation'),
                                  metainfo=dict(classes=ADE_CLASSES), pipeline=[])
    # mmseg's ADE20KDataset would map these names to ADE20K's indices and ignore all other labels
    assert dataset.label_map is None
    assert dataset.metainfo['classes'] == ADE_CLASSES
    assert len(dataset.metainfo['palette']) == len(ADE_CLASSES)


@pytest.mark.parametrize('num_classes', [0, -3, 2.5, True])
def test_check_seg_labels_arguments(num_classes):
    with pytest.raises(ValueError, match='num_classes'):
        CheckSegLabels(num_classes=num_classes)


def test_check_without_loaded_labels_says_where_it_belongs():
    with pytest.raises(ValueError, match="after mmseg's LoadAnnotations"):
        CheckSegLabels(num_classes=3)(dict(img_path='a.jpg'))


def test_infinite_sampler_config_serves_every_epoch(clean_root):
    # mmseg's iteration-based configs train with InfiniteSampler; Lightning re-iterates the loader
    # each epoch, which must not come back empty after the first (max_steps would never be reached).
    cfg = config(clean_root)
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.train_dataloader.batch_size = 1
    data = MMDataModule(cfg, seed=0)
    data.setup('fit')
    loader = data.train_dataloader()
    assert len(loader) == 2
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        paths = [batch['data_samples'][0].img_path for batch in loader]
        assert sorted(paths) == sorted(str(p) for p in (clean_root / 'images' / 'training').glob('*.jpg'))
