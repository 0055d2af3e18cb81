"""Data checks for every dataset that train() and test() build, whatever type the config names.

The tiny detection config names mmdet's plain ``CocoDataset``, the seg config mmseg's plain
``ADE20KDataset``. Each row breaks one thing and asserts the whole message. Checks that run at
start-up (names, JSON) leave no work dir; checks of file contents run where the loader reads the
file (a start-up read of every image would cost minutes on COCO's 118k images), so those rows
assert that no checkpoint was written.
"""
from __future__ import annotations

import logging
import re
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from PIL import Image

from acmix_mm.datasets.checked_types import checked_class, with_data_checks
from acmix_mm.datasets.synthetic import generate_ade_scenes
from acmix_mm.lightning import MMDataModule, train
from acmix_mm.lightning import test as run_test

from .test_bad_inputs import Ctx, clean_coco, ctx  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SEG_CONFIG = REPO / 'configs' / 'demo' / 'semfpn_acmix-r26-slim_shapes-ade.py'


def _ann(ctx: Ctx, split: str = 'train') -> str:
    return str(ctx.root / 'annotations' / f'instances_{split}.json')


def _image(ctx: Ctx, index: int = 1) -> Path:
    return ctx.root / 'images' / f'train_{index:03d}.png'


# -- start-up checks: each row breaks the data and returns the message it expects ----------------------
def _missing_image(ctx: Ctx) -> str:
    _image(ctx).unlink()
    return (f"1 of 4 images listed in annotation file {_ann(ctx)!r} do not exist: "
            f"'{_image(ctx)}' (image folder(s): '{ctx.root}/images')")


def _duplicate_image_id(ctx: Ctx) -> str:
    data = ctx.ann()
    data['images'][2]['id'] = data['images'][0]['id']
    ctx.write_ann(data)
    return (f"annotation file {_ann(ctx)!r}: image id 1 is used twice, by images[0] "
            "('train_000.png') and images[2] ('train_002.png'); image ids must be unique")


def _every_category_unknown(ctx: Ctx) -> str:
    data = ctx.ann()
    for ann in data['annotations']:
        ann['category_id'] = 7
    ctx.write_ann(data)
    n = len(data['annotations'])
    return (f"no usable annotation of the classes ('square', 'bar') in {_ann(ctx)!r} to train on "
            f"(skipped {n} of {n} annotations: {n} unknown category id; "
            "filter_cfg={'filter_empty_gt': True, 'min_size': 1} kept 0 of 4 images)")


def _no_annotations(ctx: Ctx) -> str:
    data = ctx.ann()
    data['annotations'] = []
    ctx.write_ann(data)
    return (f"no usable annotation of the classes ('square', 'bar') in {_ann(ctx)!r} to train on "
            "(skipped 0 of 0 annotations; filter_cfg={'filter_empty_gt': True, 'min_size': 1} kept 0 of 4 images)")


@pytest.mark.parametrize('breaks', [_missing_image, _duplicate_image_id, _every_category_unknown, _no_annotations])
def test_checked_at_start_up(ctx, breaks: Callable[[Ctx], str]):  # noqa: F811
    assert ctx.cfg.train_dataloader.dataset.type == 'CocoDataset'  # the config names mmdet's own class
    expected = breaks(ctx)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        train(ctx.cfg, accelerator='cpu', logger=False)
    assert str(info.value) == expected
    assert not ctx.work_dir.exists()


def test_test_checks_its_dataset_at_start_up(ctx, tmp_path):  # noqa: F811
    data = ctx.ann('val')
    data['images'][1]['id'] = data['images'][0]['id']
    ctx.write_ann(data, split='val')
    module_ckpt = tmp_path / 'w.ckpt'
    torch.save({'state_dict': {}}, module_ckpt)  # read (safely) before the data; not loaded
    with pytest.raises(ValueError) as info:
        run_test(ctx.cfg, str(module_ckpt), work_dir=str(ctx.work_dir))
    assert str(info.value) == (f"annotation file {_ann(ctx, 'val')!r}: image id 1 is used twice, by images[0] "
                               "('val_000.png') and images[1] ('val_001.png'); image ids must be unique")
    assert not ctx.work_dir.exists()


# -- loader checks ---------------------------------------------------------------------------------
def _text_file_named_png(ctx: Ctx) -> str:
    _image(ctx).write_text('not a png, a text file')
    return (f"image file '{_image(ctx)}' listed in annotation file {_ann(ctx)!r} is not an image file "
            "(22 bytes, starting b'not a png, a'); allowed formats: JPEG, PNG, BMP, GIF, TIFF, WebP")


def _truncated_png(ctx: Ctx) -> str:
    data = _image(ctx).read_bytes()
    _image(ctx).write_bytes(data[:len(data) // 2])
    return (f"image file '{_image(ctx)}' listed in annotation file {_ann(ctx)!r} could not be decoded: it starts "
            f"like a PNG file ({len(data) // 2:,} bytes) but is truncated or corrupt "
            f"(AssertionError: failed to load image: {_image(ctx)})")


def _size_differs(ctx: Ctx) -> str:
    data = ctx.ann()
    data['images'][1]['width'] = 80
    ctx.write_ann(data)
    return (f"image '{_image(ctx)}' is 64x64 (HxW) but annotation file {_ann(ctx)!r} gives height=64, width=80: "
            'its boxes and masks would be placed on an image of another size. Correct the annotation file or '
            'the image.')


def _size_swapped(ctx: Ctx) -> str:
    data = ctx.ann()
    data['images'][1].update(width=64, height=48)
    ctx.write_ann(data)
    Image.new('RGB', (48, 64)).save(_image(ctx))  # 64 high, 48 wide
    return (f"image '{_image(ctx)}' is 64x48 (HxW) but annotation file {_ann(ctx)!r} gives height=48, width=64: "
            'its boxes and masks would be placed on an image of another size. Correct the annotation file or '
            'the image. The sizes are swapped: an EXIF orientation tag may rotate the image as it is decoded; '
            "LoadImageFromFile(color_type='color_ignore_orientation') reads it as stored.")


@pytest.mark.parametrize('breaks', [_text_file_named_png, _truncated_png, _size_differs, _size_swapped])
def test_checked_where_the_loader_reads_the_image(ctx, breaks: Callable[[Ctx], str]):  # noqa: F811
    expected = breaks(ctx)
    with pytest.raises(ValueError) as info:
        train(ctx.cfg, accelerator='cpu', logger=False)
    assert str(info.value) == expected
    assert not list(ctx.work_dir.glob('checkpoints/*.ckpt'))


def test_skipped_annotations_are_counted_for_plain_coco_dataset(ctx):  # noqa: F811
    data = ctx.ann()
    data['annotations'][0]['bbox'] = '1 2 3 4'   # mmdet: "too many values to unpack"
    data['annotations'][1]['bbox'][2] = -3       # negative width: mmdet drops it silently
    data['annotations'][2]['category_id'] = 9    # no such category: dropped silently
    ctx.write_ann(data)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        module = MMDataModule(ctx.cfg)
        module.setup('fit')
    finally:
        logger.removeHandler(handler)
    n = len(data['annotations'])
    assert (f"CocoDataset {_ann(ctx)!r}: skipped 3 of {n} annotations: 1 malformed (bbox not 4 numbers, or no "
            'area/category_id), 1 zero or negative width/height, 1 unknown category id') in lines
    dataset = module.datasets['train']
    assert dict(dataset.skipped_annotations) == dict(malformed=1, non_positive_size=1, unknown_category=1)
    kept = sum(len(dataset.get_data_info(i)['instances']) for i in range(len(dataset)))
    assert kept == n - 3


def test_checked_class_keeps_samples_and_pickles(ctx):  # noqa: F811
    from mmdet.datasets import CityscapesDataset, CocoDataset, CocoPanopticDataset, LVISV1Dataset, Objects365V2Dataset
    from mmdet.registry import DATASETS
    checked = checked_class(CocoDataset)
    assert checked is checked_class(CocoDataset) and issubclass(checked, CocoDataset)
    assert checked.__name__ == 'CocoDataset' and checked_class(checked) is None
    assert checked_class(CityscapesDataset) is not None and checked_class(Objects365V2Dataset) is not None
    for other_api in (LVISV1Dataset, CocoPanopticDataset):  # other annotation APIs: left alone
        assert checked_class(other_api) is None
    cfg = ctx.cfg.train_dataloader.dataset
    plain = DATASETS.build(cfg)
    wrapped = DATASETS.build(with_data_checks(dict(type='RepeatDataset', times=2, dataset=cfg)))
    assert type(wrapped.dataset) is checked and len(wrapped) == 2 * len(plain)
    for i in range(len(plain)):
        a, b = plain[i], wrapped[i]
        assert torch.equal(a['inputs'], b['inputs'])
        assert torch.equal(a['data_samples'].gt_instances.bboxes.tensor, b['data_samples'].gt_instances.bboxes.tensor)
    again = pickle.loads(pickle.dumps(wrapped.dataset))
    assert type(again) is checked and len(again) == len(plain)
    assert torch.equal(again[0]['inputs'], plain[0]['inputs'])
    # lightning.check_data=False builds the config's own class.
    ctx.cfg.lightning = dict(ctx.cfg.lightning, check_data=False)
    module = MMDataModule(ctx.cfg)
    module.setup('fit')
    assert type(module.datasets['train']) is CocoDataset


# -- mmseg -----------------------------------------------------------------------------------------
@pytest.fixture
def seg_cfg(tmp_path) -> Config:
    root = generate_ade_scenes(tmp_path / 'ade', num_train=2, num_val=2, size=(48, 64))
    cfg = Config.fromfile(str(SEG_CONFIG))
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.update(type='ADE20KDataset', data_root=str(root))  # mmseg's own class
        cfg[key].dataset.metainfo = None
        cfg[key].dataset.pipeline = [t for t in cfg[key].dataset.pipeline
                                     if not t['type'].startswith('acmix_mm.Check')]
        cfg[key].num_workers = 0
    cfg.work_dir = str(tmp_path / 'work')
    return cfg


def _labels(cfg: Config) -> list:
    return sorted(Path(cfg.train_dataloader.dataset.data_root, 'annotations', 'training').glob('*.png'))


def test_seg_missing_label_map_at_start_up(seg_cfg):
    label = _labels(seg_cfg)[1]
    label.unlink()
    root = seg_cfg.train_dataloader.dataset.data_root
    with pytest.raises(FileNotFoundError) as info:
        MMDataModule(seg_cfg).setup('fit')
    assert str(info.value) == f"1 of 2 label maps of ADE20KDataset(data_root={root!r}) do not exist: '{label}'"


def test_seg_label_map_checked_where_it_is_loaded(seg_cfg):
    labels = _labels(seg_cfg)
    root = seg_cfg.train_dataloader.dataset.data_root
    data = labels[0].read_bytes()
    labels[0].write_bytes(data[:len(data) // 2])
    Image.new('L', (64, 40)).save(labels[1])  # 40 high: its image is 48
    module = MMDataModule(seg_cfg)
    module.setup('fit')
    dataset = module.datasets['train']
    order = [Path(dataset.get_data_info(i)['seg_map_path']) for i in range(2)]
    errors = {}
    for i in range(2):
        with pytest.raises(ValueError) as info:
            dataset[i]
        errors[order[i]] = str(info.value)
    assert errors[labels[0]] == (
        f"label map file '{labels[0]}' listed in ADE20KDataset(data_root={root!r}) could not be decoded: it starts "
        f"like a PNG file ({len(data) // 2:,} bytes) but is truncated or corrupt (OSError: image file is truncated)")
    image = Path(dataset.get_data_info(order.index(labels[1]))['img_path'])
    assert errors[labels[1]] == (f"label map '{labels[1]}' has shape (40, 64) but its image '{image}' is 48x64 "
                                 '(HxW); a label map must be a single-channel PNG of the same height and width')


def test_benchmark_tool_times_both_checks(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('bench_checks', REPO / 'tools' / 'benchmark_data_checks.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for i in range(3):
        (tmp_path / f'{i}.png').write_bytes(b'x')
    assert tool.main(['--folder', str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('3 files (page cache ')
    listing = re.match(r'^  folder listing \(start-up check\): +(\d+\.\d\d) s   0 missing$', lines[1])
    reading = re.match(r'^  open \+ read 16 bytes of every file: +(\d+\.\d\d) s$', lines[2])
    assert listing and reading, lines
    with pytest.raises(SystemExit):
        tool.main(['--num-files', '0'])
    assert "--num-files must be >= 1, got 0" in capsys.readouterr().err
