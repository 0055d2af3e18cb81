"""A table of bad configs and bad data: each fails with an error naming the bad value and what is allowed.

Rows build the real thing (backbones, mmdet detectors through mmdet's registry, datasets through
mmdet/mmseg code, the Lightning ``train`` entry point) on small data written here. Rows marked
``no_output`` run through ``acmix_mm.lightning.train`` and also check that the work dir was never
created. Rows already covered elsewhere (tests/models, tests/lightning/test_errors.py,
tests/lightning/test_seg_checks.py) appear here only where this table asserts more of the message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope

from acmix_mm.datasets.ade_layout import ADE20KLayoutDataset
from acmix_mm.datasets.synthetic import generate_ade_scenes
from acmix_mm.datasets.validation import CheckedCocoDataset, build_dataset, skipped_summary, validate_dataset
from acmix_mm.lightning import train
from acmix_mm.lightning.section import check_lightning_section
from acmix_mm.lightning.spec import LoopSpec
from acmix_mm.models.backbones.resnet_acmix import ResNetACMix
from acmix_mm.models.backbones.swin_acmix import SwinACMix

from .lightning.helpers import CLASSES, make_coco, tiny_maskrcnn_config

SLIM = dict(depth=26, base_channels=8, head=2)
SWIN = dict(arch=dict(embed_dims=24, depths=(2, 2), num_heads=(1, 2)), out_indices=(0, 1))
RESNET_KEYS = ('depth, in_channels, stem_channels, base_channels, num_stages, strides, dilations, '
               'out_indices, style, frozen_stages, norm_cfg, norm_eval, with_cp, zero_init_residual, '
               'pretrained, init_cfg, acmix_stages, kernel_att, head, kernel_conv, attn_impl')


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def clean_coco(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp('coco'), n_train=4, n_val=3)


@dataclass
class Ctx:
    """What a row may break: a fresh copy of the COCO set, a config on it, a work dir."""

    root: Path
    cfg: ConfigDict
    work_dir: Path

    def ann(self, split: str = 'train') -> dict:
        return json.loads((self.root / 'annotations' / f'instances_{split}.json').read_text())

    def write_ann(self, data: Any, split: str = 'train', raw: str = None) -> Path:
        path = self.root / 'annotations' / f'instances_{split}.json'
        path.write_text(raw if raw is not None else json.dumps(data))
        return path

    def coco(self, split: str = 'train', **kwargs: Any) -> CheckedCocoDataset:
        """Build acmix_mm.CheckedCocoDataset on the split through mmdet's registry."""
        from mmdet.registry import DATASETS
        init_default_scope('mmdet')
        cfg = dict(type='acmix_mm.CheckedCocoDataset', data_root=str(self.root),
                   ann_file=f'annotations/instances_{split}.json', data_prefix=dict(img='images/'),
                   metainfo=dict(classes=CLASSES), filter_cfg=dict(filter_empty_gt=True, min_size=1),
                   pipeline=[])
        cfg.update(kwargs)
        return DATASETS.build(cfg)


@pytest.fixture
def ctx(clean_coco, tmp_path) -> Ctx:
    root = Path(shutil.copytree(clean_coco, tmp_path / 'coco'))
    work_dir = tmp_path / 'work'
    return Ctx(root, tiny_maskrcnn_config(root, max_iters=2, work_dir=work_dir), work_dir)


def run_train(ctx: Ctx) -> None:
    train(ctx.cfg, accelerator='cpu', logger=False)


def with_lightning(**section: Any) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        ctx.cfg.lightning = dict(ctx.cfg.lightning, **section)
        run_train(ctx)
    return run


def acmix_detector(**backbone: Any) -> Callable[[Ctx], None]:
    """The tiny Mask R-CNN with a ResNetACMix backbone given ``backbone`` (built by mmdet's MODELS)."""
    def run(ctx: Ctx) -> None:
        ctx.cfg.model.backbone = dict(type='acmix_mm.ResNetACMix', **backbone)
        run_train(ctx)
    return run


def set_train_cfg(**train_cfg: Any) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        ctx.cfg.train_cfg = train_cfg
        run_train(ctx)
    return run


# ----------------------------------------------------------------------------- data breakers
def _empty_images(ctx: Ctx) -> None:
    data = ctx.ann()
    data['images'], data['annotations'] = [], []
    ctx.write_ann(data)
    ctx.coco()


def _no_image_files(ctx: Ctx) -> None:
    for image in (ctx.root / 'images').iterdir():
        image.unlink()
    ctx.coco()


def _garbage_jpg(ctx: Ctx) -> None:
    data = ctx.ann()
    data['images'][1]['file_name'] = 'broken.jpg'
    (ctx.root / 'images' / 'broken.jpg').write_bytes(b'<html>404 Not Found</html>' + bytes(200))
    ctx.write_ann(data)
    dataset = ctx.coco(pipeline=[dict(type='LoadImageFromFile')])  # names only at start-up
    for i in range(len(dataset)):
        dataset[i]  # the content is checked where it is loaded


def _garbage_jpg_in_mmcv_loader(ctx: Ctx) -> None:
    from mmcv.transforms import LoadImageFromFile
    path = ctx.root / 'images' / 'broken.jpg'
    path.write_bytes(b'\xff\xd8\xff' + bytes(range(256)) * 4)  # a JPEG header, then garbage
    LoadImageFromFile()(dict(img_path=str(path)))


def _truncated_json(ctx: Ctx) -> None:
    text = (ctx.root / 'annotations' / 'instances_train.json').read_text()
    ctx.write_ann(None, raw=text[:len(text) // 2])
    ctx.coco()


def _truncated_json_through_build_dataset(ctx: Ctx) -> None:
    text = (ctx.root / 'annotations' / 'instances_train.json').read_text()
    ctx.write_ann(None, raw=text[:-3])
    init_default_scope('mmdet')
    build_dataset(dict(ctx.cfg.train_dataloader.dataset, type='acmix_mm.CheckedCocoDataset'),
                  'train_dataloader.dataset')


def _json_not_coco(ctx: Ctx) -> None:
    ctx.write_ann({'annotations': [], 'categories': [], 'info': {}})
    ctx.coco()


def _image_without_size(ctx: Ctx) -> None:
    data = ctx.ann()
    del data['images'][2]['height']
    ctx.write_ann(data)
    ctx.coco()


def _class_not_in_file(ctx: Ctx) -> None:
    ctx.coco(metainfo=dict(classes=('square', 'barr')))


def _every_annotation_bad(ctx: Ctx) -> None:
    data = ctx.ann()
    for ann in data['annotations']:
        ann['bbox'] = [200, 200, 10, 10]  # the images are 64x64
    ctx.write_ann(data)
    ctx.coco()


def _empty_plain_dataset(ctx: Ctx) -> None:
    init_default_scope('mmdet')
    data = ctx.ann()
    data['annotations'] = []
    ctx.write_ann(data)
    # mmdet's own CocoDataset: filter_empty_gt removes every image
    build_dataset(ctx.cfg.train_dataloader.dataset, 'train_dataloader.dataset')


def _empty_unserialised_dataset(ctx: Ctx) -> None:
    from mmdet.registry import DATASETS
    init_default_scope('mmdet')
    data = ctx.ann()
    data['images'], data['annotations'] = [], []
    ctx.write_ann(data, split='val')
    dataset = DATASETS.build(dict(ctx.cfg.val_dataloader.dataset, serialize_data=False))
    validate_dataset(dataset, 'val_dataloader.dataset')


def _ade_without_pngs(ctx: Ctx) -> None:
    root = generate_ade_scenes(ctx.root.parent / 'ade', num_train=1, num_val=2, size=(32, 32))
    for png in (root / 'annotations' / 'validation').glob('*.png'):
        png.unlink()
    ADE20KLayoutDataset(data_root=str(root), pipeline=[],
                        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'))


def _missing_data_root(ctx: Ctx) -> None:
    ctx.cfg.train_dataloader.dataset.data_root = str(ctx.root / 'no_such_root')
    run_train(ctx)


# ----------------------------------------------------------------------------- the table
def backbone(cls: type, **kwargs: Any) -> Callable[[Ctx], None]:
    return lambda ctx: cls(**kwargs)


def lightning_value(**section: Any) -> Callable[[Ctx], None]:
    return lambda ctx: check_lightning_section(section)


def row(name: str, action: Callable[[Ctx], None], error: type, match: str, no_output: bool = False):
    return pytest.param(action, error, match, no_output, id=name)


ROWS = [
    # --- wrong types
    row('depth-str', backbone(ResNetACMix, depth='50'), TypeError,
        r"invalid depth '50' \(str\) for ResNetACMix: depth is an int; allowed: \[26, 38, 50, 101\]"),
    row('out_indices-int', backbone(ResNetACMix, **SLIM, out_indices=3), TypeError,
        r'out_indices must be a list or tuple of stage indices in \[0, 3\], got the int 3; '
        r'for one stage write \(3,\)'),
    row('swin-out_indices-int', backbone(SwinACMix, **{**SWIN, 'out_indices': 1}), TypeError,
        r'out_indices must be a list or tuple of stage indices in 0\.\.1, got the int 1'),
    row('head-float', backbone(ResNetACMix, depth=26, head=2.0), TypeError,
        r'head must be an int >= 1, got 2\.0 \(float\)'),
    row('acmix_stages-length', backbone(ResNetACMix, **SLIM, acmix_stages=(True, False)), ValueError,
        r'acmix_stages must have one entry per stage \(num_stages=4\), got 2: \(True, False\)'),
    row('acmix_stages-str', backbone(ResNetACMix, **SLIM, acmix_stages='TTTT'), TypeError,
        r"acmix_stages must be a list or tuple of 4 values, one per stage, got 'TTTT' \(str\)"),
    row('swin-acmix_stages-mixed', backbone(SwinACMix, **SWIN, acmix_stages=(True, 1)), TypeError,
        r'acmix_stages mixes bools and ints: \(True, 1\); give stage indices in 0\.\.1 or 2 bools'),
    row('swin-acmix_stages-bools-length', backbone(SwinACMix, **SWIN, acmix_stages=(False, True, True)), ValueError,
        r'acmix_stages as bools must have one entry per stage \(2\), got 3: \(False, True, True\)'),
    row('swin-with_cp-str', backbone(SwinACMix, **SWIN, with_cp='yes'), TypeError,
        r"with_cp must be a bool \(True or False\), got 'yes' \(str\)"),
    row('strides-length', backbone(ResNetACMix, **SLIM, strides=(1, 2, 2)), ValueError,
        r'strides must have one entry per stage \(num_stages=4\), got 3: \(1, 2, 2\)'),
    row('norm_cfg-type', backbone(ResNetACMix, **SLIM, norm_cfg=dict(type='LN')), ValueError,
        r"norm_cfg type 'LN' is not supported by ResNetACMix; allowed: \['BN', 'BN2d', 'GN', 'SyncBN'\]"),
    row('lightning-list', lambda ctx: check_lightning_section([dict(devices=2)]), TypeError,
        r"the lightning section must be a dict, e\.g\. lightning=dict\(devices=2\), got a list"),
    row('lightning-checkpoint-list', lightning_value(checkpoint=['last']), TypeError,
        r"lightning\.checkpoint must be a dict with keys from \('save_last', 'save_top_k', 'monitor', "
        r"'mode'\), got \['last'\] \(list\)"),
    row('train_cfg-list', lambda ctx: LoopSpec.from_config(ConfigDict(train_cfg=[12])), TypeError,
        r'train_cfg must be a dict, got a list: \[12\]'),
    # --- unknown keys (directly and inside a detector built by mmdet's MODELS)
    row('depht', backbone(ResNetACMix, depht=50), TypeError,
        r"backbone ResNetACMix got unknown argument 'depht' \(did you mean 'depth'\?\); allowed: "
        + re.escape(RESNET_KEYS)),
    row('attn_imp', backbone(ResNetACMix, depth=26, attn_imp='lean'), TypeError,
        r"backbone ResNetACMix got unknown argument 'attn_imp' \(did you mean 'attn_impl'\?\)"),
    row('swin-window', backbone(SwinACMix, **SWIN, window=7), TypeError,
        r"backbone SwinACMix got unknown argument 'window' \(did you mean 'window_size'\?\); "
        r'allowed: arch, in_channels, patch_size, window_size'),
    row('detector-depht', acmix_detector(depht=26, base_channels=4), TypeError,
        r"backbone ResNetACMix got unknown argument 'depht' \(did you mean 'depth'\?\)", no_output=True),
    row('lightning-key', lightning_value(devcies=2), ValueError,
        r"lightning=dict\(\.\.\.\) got unknown key 'devcies' \(did you mean 'devices'\?\); allowed: accelerator, devices"),
    # --- impossible values
    row('out_indices-4', backbone(ResNetACMix, **SLIM, out_indices=(0, 4)), ValueError,
        r'each of out_indices must be in \[0, 3\], got 4'),
    row('out_indices-negative', backbone(ResNetACMix, **SLIM, out_indices=(-1,)), ValueError,
        r'each of out_indices must be in \[0, 3\], got -1'),
    row('out_indices-duplicates', backbone(ResNetACMix, **SLIM, out_indices=(1, 1)), ValueError,
        r'out_indices has duplicates: \(1, 1\); each stage may be output once'),
    row('out_indices-empty', backbone(ResNetACMix, **SLIM, out_indices=()), ValueError,
        r'out_indices is empty: name at least one stage to output \(stage indices in \[0, 3\]\)'),
    row('swin-out_indices-duplicates', backbone(SwinACMix, **{**SWIN, 'out_indices': (1, 1)}), ValueError,
        r'out_indices has duplicates: \(1, 1\)'),
    row('frozen_stages--2', backbone(ResNetACMix, **SLIM, frozen_stages=-2), ValueError,
        r'frozen_stages must be in \[-1, 4\], got -2'),
    row('frozen_stages-5', backbone(ResNetACMix, **SLIM, frozen_stages=5), ValueError,
        r'frozen_stages must be in \[-1, 4\], got 5'),
    row('num_stages-0', backbone(ResNetACMix, **SLIM, num_stages=0), ValueError,
        r'num_stages must be in \[1, 4\], got 0'),
    row('depth-34', backbone(ResNetACMix, depth=34), ValueError,
        r'invalid depth 34 for ResNetACMix; allowed: \[26, 38, 50, 101\]'),
    row('swin-arch', backbone(SwinACMix, arch='base'), ValueError,
        r"arch 'base' is not one of \['small', 'tiny'\] \(or give a dict with embed_dims, depths, num_heads\)"),
    row('swin-window_size-0', backbone(SwinACMix, **SWIN, window_size=0), ValueError,
        r'window_size must be an int >= 1, got 0'),
    row('swin-drop_path_rate-1', backbone(SwinACMix, **SWIN, drop_path_rate=1.0), ValueError,
        r'drop_path_rate must be in \[0\.0, 1\.0\), got 1\.0'),
    row('swin-drop_path_rate-negative', backbone(SwinACMix, **SWIN, drop_path_rate=-0.1), ValueError,
        r'drop_path_rate must be in \[0\.0, 1\.0\), got -0\.1'),
    # --- the lightning section and train_cfg
    row('precision-fp17', with_lightning(precision='fp17'), ValueError,
        # (quotes: trainer.py's own wording, or check_lightning_section's once trainer.py calls it)
        r"precision='fp17' is not supported; allowed: '?32'?, '?32-true'?, '?16-mixed'?, '?bf16-mixed'?",
        no_output=True),
    row('devices-many', lightning_value(devices='many'), ValueError,
        r"lightning\.devices='many' is not valid; allowed: 'auto', an int >= 1 \(how many\), -1 \(all\)"),
    row('nan_policy-ignore', lightning_value(nan_policy='ignore'), ValueError,
        r"lightning\.nan_policy='ignore' is not supported; allowed: 'raise', 'skip'"),
    row('loggers-wandb', with_lightning(loggers='wandb'), ValueError,
        r"lightning\.loggers(=| has )'wandb'.*; allowed: '?tensorboard'?, '?csv'?", no_output=True),
    row('loggers-wandb-section', lightning_value(loggers=['csv', 'wandb']), ValueError,
        r"lightning\.loggers='wandb' is not supported; allowed: 'tensorboard', 'csv'"),
    row('max_epochs-0', set_train_cfg(type='EpochBasedTrainLoop', max_epochs=0), ValueError,
        r'train_cfg\.max_epochs must be a positive int, got 0', no_output=True),
    row('max_iters-negative', set_train_cfg(type='IterBasedTrainLoop', max_iters=-5), ValueError,
        r'train_cfg\.max_iters must be a positive int, got -5', no_output=True),
    row('val_interval-str', set_train_cfg(type='EpochBasedTrainLoop', max_epochs=1, val_interval='2'),
        ValueError, r"train_cfg\.val_interval must be a positive int, got '2'", no_output=True),
    row('missing-data_root', _missing_data_root, FileNotFoundError,
        r"train_dataloader\.dataset\.data_root='.*no_such_root' is not a directory", no_output=True),
    # --- data
    row('ann_file-zero-images', _empty_images, ValueError,
        r"annotation file '.*instances_train\.json' lists no images \(\"images\" is empty\)"),
    row('image-folder-empty', _no_image_files, FileNotFoundError,
        r"4 of 4 images listed in annotation file '.*instances_train\.json' do not exist: "
        r"'.*train_000\.png', '.*train_001\.png', '.*train_002\.png' and 1 more \(image folder\(s\): '.*images'\)"),
    row('garbage-jpg', _garbage_jpg, ValueError,
        r"image file '.*broken\.jpg' listed in annotation file '.*' is not an image file \(226 bytes, starting "
        r"b'<html>404 No'\); allowed formats: JPEG, PNG, BMP, GIF, TIFF, WebP"),
    row('garbage-jpg-mmcv', _garbage_jpg_in_mmcv_loader, AssertionError,
        r'failed to load image: .*broken\.jpg'),
    row('json-truncated', _truncated_json, ValueError,
        r"annotation file '.*instances_train\.json' is not valid JSON: .* \(byte \d+ of \d+\) "
        r'\(the file ends early: truncated or still downloading\?\)'),
    row('json-truncated-build_dataset', _truncated_json_through_build_dataset, ValueError,
        r"annotation file '.*instances_train\.json' is not valid JSON: .*truncated or still downloading"),
    row('json-not-coco', _json_not_coco, ValueError,
        r"annotation file '.*' is not in COCO format: it has no \"images\" list \(top-level keys: "
        r"\['annotations', 'categories', 'info'\]\)"),
    row('image-without-height', _image_without_size, ValueError,
        r"images\[2\] has no height .*every COCO image needs id, file_name, width, height"),
    row('class-not-in-categories', _class_not_in_file, ValueError,
        r"classes \['barr'\] of the config are not categories of '.*'; its category names are \['bar', 'square'\]"),
    row('every-annotation-outside', _every_annotation_bad, ValueError,
        r"no usable annotation of the classes \('square', 'bar'\) in '.*instances_train\.json' to train on "
        r"\(skipped \d+ of \d+ annotations: \d+ outside image; filter_cfg=\{'filter_empty_gt': True, 'min_size': 1\} "
        r"kept 4 of 4 images\)"),
    row('empty-plain-CocoDataset', _empty_plain_dataset, ValueError,
        r"train_dataloader\.dataset is empty: CocoDataset\(ann_file='.*instances_train\.json', "
        r"data_root='.*', data_prefix=.*filter_cfg=.*\) has no samples"),
    row('empty-unserialised', _empty_unserialised_dataset, ValueError,
        r"val_dataloader\.dataset is empty: CocoDataset\(ann_file='.*instances_val\.json'"),
    row('ade-no-pngs', _ade_without_pngs, FileNotFoundError,
        r"2 of 2 images in '.*images/validation' have no label PNG: '.*\.png', '.*\.png' do not exist"),
]


def test_the_table_is_large_enough():
    assert len(ROWS) >= 30


@pytest.mark.parametrize('action, error, match, no_output', ROWS)
def test_bad_input_is_named(ctx, action, error, match, no_output):
    with pytest.raises(error, match=match):
        action(ctx)
    if no_output:
        assert not ctx.work_dir.exists(), 'the failing run wrote output'


# ----------------------------------------------------------------------------- what still works
def test_even_swin_window_is_allowed():
    # Swin itself uses even windows (Swin-B at 384 px: 12); the shift is window // 2.
    model = SwinACMix(**SWIN, window_size=8)
    outs = model(torch.randn(1, 3, 70, 90))
    assert [tuple(o.shape) for o in outs] == [(1, 24, 18, 23), (1, 48, 9, 12)]


def test_swin_acmix_stages_as_bools_mean_the_same_stages_as_indices():
    as_bools = SwinACMix(**SWIN, acmix_stages=(False, True))
    as_indices = SwinACMix(**SWIN, acmix_stages=(1,))
    assert as_bools.acmix_stages == as_indices.acmix_stages == (1,)
    # stage 0 really has no conv branch, stage 1 has one
    assert [s.blocks[0].attn.use_acmix for s in as_bools.stages] == [False, True]


def test_valid_lightning_sections_pass():
    section = dict(accelerator='cpu', devices='0,1', num_nodes=2, precision='bf16-mixed', nan_policy='skip',
                   per_sample_seed=False,
                   sync_bn='revert', log_every_n_steps=5, num_sanity_val_steps=-1, enable_progress_bar=False,
                   checkpoint=dict(save_last=True, save_top_k=3, monitor='coco/bbox_mAP', mode='max'),
                   loggers=('csv',), trainer_kwargs=dict(gradient_clip_val=1.0))
    assert check_lightning_section(section) == section
    for devices in ('auto', 1, -1, [0, 1], '2'):
        check_lightning_section(dict(devices=devices))
    assert check_lightning_section(None) == {}


def _log_lines(action: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``action`` and return its result and what it logged through mmengine's current logger."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    handler = Keep(level=logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return action(), lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_skipped_annotations_are_counted_and_logged(ctx):
    data = ctx.ann()
    anns = data['annotations']
    n_clean = len(anns)
    base = dict(iscrowd=0, segmentation=[[1, 1, 9, 1, 9, 9, 1, 9]])
    extra = [
        dict(image_id=1, category_id=1, bbox=[2, 2, 10, 10], area=0.0),      # zero-area
        dict(image_id=1, category_id=1, bbox=[2, 2, 0, 10], area=20.0),      # zero width
        dict(image_id=1, category_id=1, bbox=[2, 2, -5, 10], area=50.0),     # negative width
        dict(image_id=2, category_id=1, bbox=[70, 70, 10, 10], area=100.0),  # outside the 64x64 image
        dict(image_id=2, category_id=1, bbox=[5, 5, 10], area=100.0),        # bbox of 3 numbers
        dict(image_id=2, category_id=9, bbox=[5, 5, 10, 10], area=100.0),    # category 9 does not exist
        dict(image_id=42, category_id=1, bbox=[5, 5, 10, 10], area=100.0),   # no image 42
        dict(image_id=3, category_id=1, bbox=[5, 5, 0.5, 10], area=5.0),     # under 1 px wide
    ]
    for i, ann in enumerate(extra):
        anns.append(dict(base, id=1000 + i, **ann))
    ctx.write_ann(data)

    dataset, lines = _log_lines(lambda: ctx.coco())
    assert dict(dataset.skipped_annotations) == dict(
        no_image=1, malformed=1, non_positive_size=2, outside_image=1, zero_area=1, under_1px=1,
        unknown_category=1)
    assert dataset.num_annotations == n_clean + len(extra)
    expected = (f"CheckedCocoDataset '{ctx.root}/annotations/instances_train.json': skipped 8 of "
                f'{n_clean + 8} annotations: 1 image id not in images, 1 malformed (bbox not 4 numbers, '
                'or no area/category_id), 2 zero or negative width/height, 1 outside image, 1 zero-area, '
                '1 narrower or shorter than 1 px, 1 unknown category id')
    assert expected in lines
    # What is left is exactly what mmdet's own CocoDataset keeps from the clean file.
    assert sum(len(dataset.get_data_info(i)['instances']) for i in range(len(dataset))) == n_clean


def test_checked_dataset_equals_mmdet_on_clean_data(ctx):
    from mmdet.registry import DATASETS
    checked, lines = _log_lines(lambda: ctx.coco())
    plain = DATASETS.build(dict(type='CocoDataset', data_root=str(ctx.root),
                                ann_file='annotations/instances_train.json', data_prefix=dict(img='images/'),
                                metainfo=dict(classes=CLASSES), filter_cfg=dict(filter_empty_gt=True, min_size=1),
                                pipeline=[]))
    assert len(checked) == len(plain) == 4
    for i in range(len(plain)):
        assert checked.get_data_info(i) == plain.get_data_info(i)
    assert any(line.endswith(f'skipped 0 of {checked.num_annotations} annotations') for line in lines)
    assert skipped_summary({}, 7) == 'skipped 0 of 7 annotations'


def test_checked_dataset_trains_through_the_data_module(ctx):
    """The registered type works from a config in mmdet's scope, with mmdet's transforms."""
    from acmix_mm.lightning import MMDataModule
    ctx.cfg.train_dataloader.dataset.type = 'acmix_mm.CheckedCocoDataset'
    data = MMDataModule(ctx.cfg)
    data.setup('fit')
    sample = data.datasets['train'][0]
    assert tuple(sample['inputs'].shape) == (3, 64, 64)
    assert len(sample['data_samples'].gt_instances) >= 1
    assert np.isfinite(sample['data_samples'].gt_instances.bboxes.numpy()).all()


def test_lightning_section_keys_are_defined_once():
    # The allowed keys are the fields of the checked section, and each one reaches the spec.
    from acmix_mm.lightning import section
    assert section.LIGHTNING_KEYS == (
        'accelerator', 'devices', 'num_nodes', 'strategy', 'precision', 'find_unused_parameters', 'nan_policy',
        'per_sample_seed', 'check_data', 'sync_bn', 'log_every_n_steps', 'num_sanity_val_steps',
        'enable_progress_bar', 'checkpoint', 'loggers', 'trainer_kwargs')
    full = dict(accelerator='cpu', devices=2, num_nodes=3, strategy='ddp', precision='bf16-mixed',
                find_unused_parameters=True, nan_policy='skip', per_sample_seed=False, check_data=False,
                sync_bn='keep',
                log_every_n_steps=7, num_sanity_val_steps=2, enable_progress_bar=False,
                checkpoint=dict(save_top_k=2), loggers='csv', trainer_kwargs=dict(max_time='00:01:00:00'))
    parsed = section.LightningSection.from_config(full)
    assert parsed.loggers == ('csv',) and dict(parsed.checkpoint) == dict(save_top_k=2)
    assert [getattr(parsed, k) for k in ('accelerator', 'devices', 'num_nodes', 'nan_policy', 'sync_bn',
                                         'check_data')] == ['cpu', 2, 3, 'skip', 'keep', False]
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.nan_policy = 'raise'
