"""Checks on datasets before training starts: clear errors for broken files, counts of skipped boxes.

Two pieces:

* :func:`build_dataset` / :func:`validate_dataset`, for any dataset (mmdet, mmseg, a wrapper): an
  empty dataset raises ``ValueError`` naming its annotation file, image folder and ``filter_cfg``,
  instead of numpy's ``need at least one array to concatenate`` from mmengine's ``full_init``,
  a loop that trains on nothing or a sampler that divides by zero.
* :class:`CocoChecks`, mixed into any mmdet dataset on mmdet's COCO API
  (:mod:`acmix_mm.datasets.checked_types` does it for every dataset ``tools/train.py`` and
  ``tools/test.py`` build), and :class:`CheckedCocoDataset` (``type='acmix_mm.CheckedCocoDataset'``),
  mmdet's ``CocoDataset`` with it. Same arguments and the same output, plus:

  - the annotation file is read with errors that name it: not JSON (a truncated download), JSON
    that is not COCO (no ``images`` list, an image without ``id``/``file_name``/``width``/
    ``height``), no images at all, two images with one ``id``;
  - every listed image must exist, checked at start-up from one listing per image folder (no
    file is opened); where the loader reads an image, a file that is not an image, a truncated
    one, or one whose size differs from the file's ``width``/``height`` raises naming it
    (:class:`~acmix_mm.datasets.image_files.CheckedLoad`; ``check_images=False`` skips both);
  - annotations that mmdet skips (zero-area or out-of-image boxes, boxes under 1 px, unknown
    category ids, ``ignore`` flags) are still skipped, as mmdet does, but counted; annotations
    that would crash mmdet's parser (a ``bbox`` that is not 4 numbers, no ``area`` or
    ``category_id``, an ``image_id`` that no image has) are skipped and counted too. One log line
    per dataset: ``CocoDataset 'annotations/instances_train.json': skipped 5 of 812
    annotations: 2 zero-area, 1 outside image, 2 unknown category id``. The counts are kept in
    ``dataset.skipped_annotations``;
  - a training set without a single usable annotation raises, naming the skip counts and the
    filter (mmdet's ``filter_empty_gt`` keeps images whose every annotation was skipped, and with
    every category id unknown would filter out every image, leaving an empty dataset).
"""
from __future__ import annotations

import collections
import json
import logging
import numbers
import os.path as osp
from typing import Any, Iterable, Mapping, Optional, Sequence

from mmengine.logging import print_log

from ..registry import DATASETS
from .image_files import IMAGE_SIGNATURES, listed, missing_files, wrap_loaders

__all__ = ['CheckedCocoDataset', 'build_dataset', 'validate_dataset', 'load_coco_json', 'check_image_files',
           'IMAGE_SIGNATURES', 'SKIP_REASONS']

# Why an annotation was skipped, in the order they are tested (the first that applies counts).
SKIP_REASONS: dict[str, str] = {
    'no_image': 'image id not in images',
    'malformed': 'malformed (bbox not 4 numbers, or no area/category_id)',
    'ignore': 'marked ignore',
    'non_positive_size': 'zero or negative width/height',
    'outside_image': 'outside image',
    'zero_area': 'zero-area',
    'under_1px': 'narrower or shorter than 1 px',
    'unknown_category': 'unknown category id',
    'not_in_classes': "category not in the config's classes",
}

# ----------------------------------------------------------------------------- annotation file
def load_coco_json(path: str) -> dict:
    """Read a COCO annotation file, with errors naming the file and what is wrong.

    Returns:
        The parsed dict, with ``annotations`` and ``categories`` defaulting to empty lists
        (a test set may have neither).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON (truncated, empty, not UTF-8), not a JSON object, no ``images``
            list, an image entry without ``id``/``file_name``/``width``/``height``,
            ``annotations``/``categories`` that are not lists, or two images with one ``id``.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'annotation file {path!r} does not exist')
    size = osp.getsize(path)
    try:
        with open(path, 'rb') as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as err:
        truncated = ' (the file ends early: truncated or still downloading?)' if err.pos >= size - 1 else ''
        raise ValueError(f'annotation file {path!r} is not valid JSON: {err.msg} at line {err.lineno} '
                         f'column {err.colno} (byte {err.pos} of {size}){truncated}; '
                         'a COCO annotation file is one JSON object') from None
    except UnicodeDecodeError as err:
        raise ValueError(f'annotation file {path!r} is not UTF-8 JSON ({err.reason} at byte {err.start}); '
                         'a COCO annotation file is one JSON object') from None
    if not isinstance(data, dict):
        raise ValueError(f'annotation file {path!r} holds a JSON {type(data).__name__}, not a COCO '
                         'object with "images", "annotations" and "categories"')
    if 'images' not in data:
        raise ValueError(f'annotation file {path!r} is not in COCO format: it has no "images" list '
                         f'(top-level keys: {sorted(data)}); expected "images", "annotations", '
                         '"categories"')
    for key in ('images', 'annotations', 'categories'):
        data.setdefault(key, [])
        if not isinstance(data[key], list):
            raise ValueError(f'annotation file {path!r}: "{key}" must be a list, got a '
                             f'{type(data[key]).__name__}')
    for i, image in enumerate(data['images']):
        missing = [k for k in ('id', 'file_name', 'width', 'height')
                   if not isinstance(image, dict) or k not in image]
        if missing:
            raise ValueError(f'annotation file {path!r}: images[{i}] has no {", ".join(missing)} '
                             f'(got {image!r:.200}); every COCO image needs id, file_name, width, height')
    _check_unique_image_ids(data['images'], path)
    return data


def _check_unique_image_ids(images: Sequence[Mapping[str, Any]], path: str) -> None:
    """Two images with one id: the COCO index would give both every annotation of either."""
    first: dict = {}
    duplicates: list = []
    for i, image in enumerate(images):
        key = image['id']
        if key in first:
            duplicates.append((key, first[key], i))
        else:
            first[key] = i
    if duplicates:
        key, a, b = duplicates[0]
        more = f' ({len(duplicates)} images repeat an earlier id)' if len(duplicates) > 1 else ''
        raise ValueError(f'annotation file {path!r}: image id {key!r} is used twice, by images[{a}] '
                         f'({images[a]["file_name"]!r}) and images[{b}] ({images[b]["file_name"]!r}){more}; '
                         'image ids must be unique')


def classify_annotation(ann: Mapping[str, Any], width: float, height: float,
                        file_cat_ids: Iterable[int], class_cat_ids: Iterable[int]) -> Optional[str]:
    """Why mmdet's ``CocoDataset.parse_data_info`` would skip ``ann`` (a ``SKIP_REASONS`` key), or None.

    Args:
        ann: one COCO annotation (``bbox`` = [x, y, w, h] in pixels).
        width, height: its image's size in pixels.
        file_cat_ids: category ids the annotation file defines.
        class_cat_ids: category ids of the config's ``classes`` (what mmdet keeps).
    """
    bbox = ann.get('bbox')
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox)
            or not isinstance(ann.get('area'), numbers.Real) or 'category_id' not in ann):
        return 'malformed'
    if ann.get('ignore', False):
        return 'ignore'
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return 'non_positive_size'
    inter_w = max(0, min(x + w, width) - max(x, 0))
    inter_h = max(0, min(y + h, height) - max(y, 0))
    if inter_w * inter_h == 0:
        return 'outside_image'
    if ann['area'] <= 0:
        return 'zero_area'
    if w < 1 or h < 1:
        return 'under_1px'
    if ann['category_id'] not in file_cat_ids:
        return 'unknown_category'
    if ann['category_id'] not in class_cat_ids:
        return 'not_in_classes'
    return None


def skipped_summary(skipped: Mapping[str, int], total: int) -> str:
    """``'skipped N of M annotations: x zero-area, y outside image, ...'`` (reasons in SKIP_REASONS order)."""
    count = sum(skipped.values())
    parts = [f'{skipped[k]} {text}' for k, text in SKIP_REASONS.items() if skipped.get(k)]
    return f'skipped {count} of {total} annotations' + (f': {", ".join(parts)}' if parts else '')


# ----------------------------------------------------------------------------- image files
def check_image_files(paths: Sequence[str], where: str) -> None:
    """Raise if an image file is missing: one folder listing per folder, no file is opened.

    What the files hold is checked where the loader reads them (:class:`CheckedLoad`).

    Args:
        paths: local image paths.
        where: what lists them, for the message (e.g. the annotation file).

    Raises:
        FileNotFoundError: some files do not exist (listed up to a few, with the count).
    """
    missing = missing_files(paths)
    if missing:
        folders = sorted({osp.dirname(p) for p in missing})
        raise FileNotFoundError(f'{len(missing)} of {len(paths)} images listed in {where} do not exist: '
                                f'{listed(missing)} (image folder(s): {listed(folders)})')


# ----------------------------------------------------------------------------- any dataset
def describe_dataset(dataset: Any) -> str:
    """``TypeName(ann_file=..., data_root=..., data_prefix=..., filter_cfg=...)`` for messages."""
    fields = []
    for key in ('ann_file', 'data_root', 'data_prefix', 'filter_cfg'):
        value = getattr(dataset, key, None)
        if value:
            fields.append(f'{key}={value!r}')
    inner = getattr(dataset, 'dataset', None) or getattr(dataset, 'datasets', None)
    if not fields and inner is not None:
        inners = inner if isinstance(inner, (list, tuple)) else [inner]
        fields.append('of ' + ', '.join(describe_dataset(d) for d in inners))
    return f'{type(dataset).__name__}({", ".join(fields)})'


_NOT_LOADED = object()


def dataset_class(dataset_cfg: Mapping[str, Any]) -> Any:
    """The class a dataset config's ``type`` names, resolved as mmengine's ``build`` resolves it
    (the config's ``_scope_``, else the default scope's registry, e.g. mmdet's, then by prefix);
    a class given directly is returned as it is."""
    from mmengine.registry import DATASETS as ROOT_DATASETS
    cls = dataset_cfg.get('type')
    if isinstance(cls, str):
        with ROOT_DATASETS.switch_scope_and_registry(dataset_cfg.get('_scope_')) as registry:
            cls = registry.get(cls)
    return cls


def build_dataset(dataset_cfg: Mapping[str, Any], where: str) -> Any:
    """Build and fully initialise a dataset config; an empty dataset raises naming its files.

    mmengine's ``BaseDataset.full_init`` fails on an empty data list with numpy's bare
    ``ValueError: need at least one array to concatenate`` (serialising nothing). The dataset is
    therefore built with ``lazy_init=True`` where its class takes it, initialised here, and an
    empty data list is reported by :func:`validate_dataset`'s message instead.

    Args:
        dataset_cfg: a dataset config (built through mmengine's ``DATASETS`` in the current scope).
        where: the config key it came from, e.g. ``'train_dataloader.dataset'``.
    """
    import copy
    import inspect

    from mmengine.config import ConfigDict
    from mmengine.dataset import BaseDataset
    from mmengine.registry import DATASETS as ROOT_DATASETS

    cfg = ConfigDict(copy.deepcopy(dict(dataset_cfg)))
    cls = dataset_class(cfg)
    # mmengine's BaseDataset and dataset wrappers take lazy_init (subclasses often via **kwargs).
    lazy = inspect.isclass(cls) and 'lazy_init' not in cfg and (
        issubclass(cls, BaseDataset) or 'lazy_init' in inspect.signature(cls.__init__).parameters)
    if lazy:
        cfg['lazy_init'] = True
    dataset = ROOT_DATASETS.build(cfg)
    if lazy and hasattr(dataset, 'full_init'):
        # full_init replaces data_list once load_data_list returns: the marker tells an empty list
        # (numpy fails serialising it) from an error while loading, which must pass unchanged.
        dataset.data_list = _NOT_LOADED
        try:
            dataset.full_init()
        except ValueError:
            if isinstance(dataset.data_list, list) and not dataset.data_list:
                raise ValueError(_empty_message(dataset, where)) from None
            raise
    validate_dataset(dataset, where)
    return dataset


def _empty_message(dataset: Any, where: str) -> str:
    return (f'{where} is empty: {describe_dataset(dataset)} has no samples. Check that the '
            'annotation file lists images, that the image folder holds them and that '
            'filter_cfg (e.g. filter_empty_gt) does not remove them all')


def validate_dataset(dataset: Any, where: str) -> None:
    """Raise ``ValueError`` if a built dataset is empty, naming its files and filter.

    Args:
        dataset: a built dataset (mmengine ``BaseDataset`` or any ``torch`` dataset with ``len``).
        where: the config key it came from, e.g. ``'train_dataloader.dataset'``.
    """
    try:
        size = len(dataset)
    except TypeError:
        return  # an iterable-style dataset: its length is unknown before iterating
    if size == 0:
        raise ValueError(_empty_message(dataset, where))


# ----------------------------------------------------------------------------- COCO dataset
try:  # mmdet is optional: an mmseg-only install has no COCO dataset to check
    from mmdet.datasets import CocoDataset as _CocoDataset
    from mmdet.datasets.api_wrappers import COCO as _COCO
except ImportError:  # pragma: no cover - exercised only without mmdet
    _CocoDataset = _COCO = None

if _CocoDataset is not None:

    class CheckedCOCO(_COCO):
        """mmdet's COCO API over a file read by :func:`load_coco_json`, minus annotations it cannot index.

        Annotations without ``id`` or ``category_id`` (pycocotools' index would raise a bare
        ``KeyError``) count as ``'malformed'``; those whose ``image_id`` is missing or names no
        image (mmdet would never read them) count as ``'no_image'``. Both are left out.

        Attributes:
            skipped: ``{reason: count}`` of the annotations left out.
            num_annotations: annotations in the file.
        """

        def __init__(self, annotation_file: str) -> None:
            super().__init__(annotation_file=None)
            data = load_coco_json(annotation_file)
            image_ids = {image['id'] for image in data['images']}
            self.skipped: collections.Counter = collections.Counter()
            kept = []
            for ann in data['annotations']:
                if not isinstance(ann, dict) or 'id' not in ann or 'category_id' not in ann:
                    self.skipped['malformed'] += 1
                elif ann.get('image_id') not in image_ids:
                    self.skipped['no_image'] += 1
                else:
                    kept.append(ann)
            self.num_annotations = len(data['annotations'])
            data['annotations'] = kept
            self.dataset = data
            self.createIndex()
            self.img_ann_map = self.imgToAnns
            self.cat_img_map = self.catToImgs

    class CocoChecks:
        """The checks of :class:`CheckedCocoDataset`, for any mmdet dataset on mmdet's COCO API.

        Put before the dataset class in the bases: ``class X(CocoChecks, CocoDataset)``.
        :func:`~acmix_mm.datasets.checked_types.with_data_checks` does this for every COCO-family
        dataset that ``tools/train.py`` and ``tools/test.py`` build.

        Args:
            check_images: check that every listed image exists (at start-up, one listing per
                folder), and in the loader that each image decodes and has the size the
                annotation file gives (local files only).
            **kwargs: the dataset's own arguments.

        Attributes:
            skipped_annotations: ``{reason: count}`` over ``SKIP_REASONS``, after loading.
            num_annotations: annotations in the file.
        """

        COCOAPI = CheckedCOCO

        def __init__(self, *args: Any, check_images: bool = True, **kwargs: Any) -> None:
            if not isinstance(check_images, bool):
                raise TypeError(f'check_images must be True or False, got {check_images!r}')
            self.check_images = check_images
            self.skipped_annotations: collections.Counter = collections.Counter()
            self.num_annotations = 0
            super().__init__(*args, **kwargs)
            if check_images and self.backend_args is None:  # local files: os can describe them
                from mmcv.transforms import LoadImageFromFile
                source = f'annotation file {self.ann_file!r}'
                self.pipeline.transforms = wrap_loaders(self.pipeline.transforms, [
                    (LoadImageFromFile, dict(path_key='img_path', what='image', source=source, check_size=True))])

        def load_data_list(self) -> list:
            self.skipped_annotations = collections.Counter()
            self._file_read = False
            data_list = super().load_data_list()
            if not data_list:
                raise ValueError(f'annotation file {self.ann_file!r} lists no images ("images" is empty); '
                                 'a dataset needs at least one image')
            if self.check_images and self.backend_args is None:
                check_image_files([info['img_path'] for info in data_list],
                                  f'annotation file {self.ann_file!r}')
            summary = skipped_summary(self.skipped_annotations, self.num_annotations)
            print_log(f'{type(self).__name__} {self.ann_file!r}: {summary}', logger='current',
                      level=logging.WARNING if self.skipped_annotations else logging.INFO)
            return data_list

        def _read_file_numbers(self) -> None:
            """Per-file numbers, taken from the COCO API while it exists (mmdet deletes it)."""
            coco = self.coco
            self._file_cat_ids = set(coco.cats)
            self.num_annotations = coco.num_annotations
            self.skipped_annotations.update(coco.skipped)
            classes = tuple(self.metainfo['classes'])
            names = {cat.get('name') for cat in coco.cats.values()}
            missing = [c for c in classes if c not in names]
            if coco.cats and missing:
                # mmdet would silently drop these classes and shift the labels of the others.
                raise ValueError(f'classes {missing} of the config are not categories of {self.ann_file!r}; '
                                 f'its category names are {sorted(n for n in names if n is not None)}')
            self._file_read = True

        def parse_data_info(self, raw_data_info: dict) -> dict:
            if not self._file_read:
                self._read_file_numbers()
            img_info = raw_data_info['raw_img_info']
            kept = []
            for ann in raw_data_info['raw_ann_info']:
                reason = classify_annotation(ann, img_info['width'], img_info['height'],
                                             self._file_cat_ids, self.cat_ids)
                if reason is not None:
                    self.skipped_annotations[reason] += 1
                if reason != 'malformed':  # mmdet's parser would crash on these; it skips the rest itself
                    kept.append(ann)
            return super().parse_data_info(dict(raw_data_info, raw_ann_info=kept))

        def filter_data(self) -> list:
            data_list = super().filter_data()
            if self.test_mode:
                return data_list
            # mmdet's filter_empty_gt looks at the file's raw category ids, so it keeps images whose
            # every annotation was skipped: a training set can be all background without it.
            if not any(info['instances'] for info in data_list):
                summary = skipped_summary(self.skipped_annotations, self.num_annotations)
                raise ValueError(f'no usable annotation of the classes {tuple(self.metainfo["classes"])} in '
                                 f'{self.ann_file!r} to train on ({summary}; filter_cfg={self.filter_cfg!r} '
                                 f'kept {len(data_list)} of {len(self.data_list)} images)')
            return data_list

    @DATASETS.register_module()
    class CheckedCocoDataset(CocoChecks, _CocoDataset):
        """mmdet's ``CocoDataset`` with checked files and counted skipped annotations (module docstring).

        Args:
            check_images: see :class:`CocoChecks`.
            **kwargs: ``CocoDataset``'s arguments.
        """
