"""Data checks for every COCO-family and mmseg dataset a run builds, whatever type the config names.

A config written from mmdet's or mmseg's bases names ``CocoDataset``, ``CityscapesDataset``,
``ADE20KDataset`` and so on. :func:`with_data_checks` rewrites a dataset config (and the datasets
inside wrappers such as ``RepeatDataset`` or ``ConcatDataset``) so that each one is built as a
subclass of its own class with acmix_mm's checks added. Samples, arguments and mmdet's/mmseg's own
skipping rules stay what they were.

* **COCO family**: mmdet's ``CocoDataset`` and its subclasses that read annotations through mmdet's
  ``COCO`` API get :class:`~acmix_mm.datasets.validation.CocoChecks`: errors that name the file for
  broken JSON, duplicate image ids, missing images, undecodable images and images whose size
  differs from the annotation file's; counted skipped annotations (unknown category ids,
  malformed boxes, ...). Datasets on other APIs (LVIS, panoptic COCO) are left as they are.
* **mmseg**: subclasses of ``BaseSegDataset`` get :class:`SegChecks`: missing images and label
  maps fail at start-up naming them, undecodable ones where they are loaded, and a label map whose
  size differs from its image's stops at that sample (``CheckSegMapSize``).

``lightning=dict(check_data=False)`` turns this off; ``MMDataModule`` calls it for every split.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

from mmengine.config import ConfigDict

from .validation import dataset_class

__all__ = ['with_data_checks', 'checked_class', 'SegChecks']

_CHECKED: Dict[type, type] = {}  # dataset class -> its checked subclass


def _rebuild(original: type, state: Dict[str, Any]) -> Any:
    """Unpickle a dataset of a checked class (made at run time, so not importable by name)."""
    cls = checked_class(original) or original
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class _Picklable:
    """Pickles an instance of a run-time checked class through its original class (spawned
    DataLoader workers and DDP processes receive the dataset pickled)."""

    def __reduce__(self) -> Any:
        original = type(self).__dict__.get('_acmix_unchecked')
        if original is None:
            return super().__reduce__()
        return _rebuild, (original, dict(self.__dict__))


def _coco_checks() -> Optional[type]:
    try:
        from .validation import CocoChecks
    except ImportError:  # pragma: no cover - an install without mmdet
        return None
    return CocoChecks


class SegChecks:
    """Checks for an mmseg ``BaseSegDataset`` subclass (put before it in the bases).

    * the data list: every image and label map it names must exist (one listing per folder);
    * in the loader: an image or label map that does not decode raises naming the file and why,
      and (unless the pipeline has one) ``CheckSegMapSize`` runs right after ``LoadAnnotations``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from mmcv.transforms import LoadImageFromFile
        from mmseg.datasets.transforms import LoadAnnotations

        from .image_files import wrap_loaders
        from .transforms import CheckSegMapSize
        source = f'{type(self).__name__}(data_root={self.data_root!r})'
        transforms = wrap_loaders(self.pipeline.transforms, [
            (LoadImageFromFile, dict(path_key='img_path', what='image', source=source)),
            (LoadAnnotations, dict(path_key='seg_map_path', what='label map', source=source))])
        if not any(isinstance(t, CheckSegMapSize) for t in transforms):
            for i, t in enumerate(transforms):
                if isinstance(getattr(t, 'loader', None), LoadAnnotations):
                    transforms.insert(i + 1, CheckSegMapSize())
                    break
        self.pipeline.transforms = transforms

    def load_data_list(self) -> list:
        from .image_files import listed, missing_files
        data_list = super().load_data_list()
        if getattr(self, 'backend_args', None) is not None:
            return data_list  # remote storage: os cannot list it
        for key, what in (('img_path', 'images'), ('seg_map_path', 'label maps')):
            paths = [info[key] for info in data_list if info.get(key)]
            missing = missing_files(paths)
            if missing:
                raise FileNotFoundError(f'{len(missing)} of {len(paths)} {what} of {type(self).__name__}'
                                        f'(data_root={self.data_root!r}) do not exist: {listed(missing)}')
        return data_list


def _reads_through_coco_api(cls: type) -> bool:
    """Whether ``cls.load_data_list`` reads the file through ``self.COCOAPI`` (which the checks
    replace): mmdet's own does, Objects365's too; LVIS's calls the ``lvis`` package instead."""
    from mmdet.datasets import CocoDataset
    method = cls.load_data_list
    code = getattr(method, '__code__', None)
    return method is CocoDataset.load_data_list or (code is not None and 'COCOAPI' in code.co_names)


def checked_class(cls: Any) -> Optional[type]:
    """The checked subclass of dataset class ``cls``, or None when no checks apply to it
    (not a dataset class acmix_mm knows, or already checked)."""
    if not isinstance(cls, type):
        return None
    if cls in _CHECKED:
        return _CHECKED[cls]
    if cls in _CHECKED.values():
        return None
    mixin = None
    coco_checks = _coco_checks()
    if coco_checks is not None and not issubclass(cls, coco_checks):
        from mmdet.datasets import CocoDataset
        from mmdet.datasets.api_wrappers import COCO
        if (issubclass(cls, CocoDataset) and getattr(cls, 'COCOAPI', None) is COCO
                and cls.parse_data_info is CocoDataset.parse_data_info and _reads_through_coco_api(cls)):
            mixin = coco_checks
    if mixin is None:
        try:
            from mmseg.datasets import BaseSegDataset
        except ImportError:  # pragma: no cover - an install without mmseg
            BaseSegDataset = None
        if BaseSegDataset is not None and issubclass(cls, BaseSegDataset) and not issubclass(cls, SegChecks):
            mixin = SegChecks
    if mixin is None:
        return None
    # Same name as the config's class, so messages and logs read as the config does.
    checked = type(cls.__name__, (_Picklable, mixin, cls), {
        '__module__': __name__, '__qualname__': cls.__qualname__, '_acmix_unchecked': cls,
        '__doc__': f'{cls.__module__}.{cls.__qualname__} with acmix_mm\'s data checks ({mixin.__name__}).'})
    _CHECKED[cls] = checked
    return checked


def with_data_checks(dataset_cfg: Mapping[str, Any]) -> ConfigDict:
    """A copy of ``dataset_cfg`` whose datasets (wrappers' inner ones too) are their checked classes.

    ``type`` strings are resolved as mmengine's ``build`` resolves them (the config's
    ``_scope_``, else the default scope); a type acmix_mm has no checks for is left unchanged.
    """
    cfg = ConfigDict(copy.deepcopy(dict(dataset_cfg)))
    if isinstance(cfg.get('dataset'), Mapping):
        cfg['dataset'] = with_data_checks(cfg['dataset'])
    if isinstance(cfg.get('datasets'), (list, tuple)):
        cfg['datasets'] = [with_data_checks(d) if isinstance(d, Mapping) else d for d in cfg['datasets']]
    checked = checked_class(dataset_class(cfg))
    if checked is not None:
        cfg['type'] = checked
    return cfg
