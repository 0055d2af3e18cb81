"""ADE20K-layout datasets: mmseg's ``ADE20KDataset`` with checked folders and a config's classes.

mmseg's ``ADE20KDataset`` lists ``images/<split>/*.jpg`` and pairs each with
``annotations/<split>/<stem>.png``, whose stored values are 0 (ignored) and 1..K (class index + 1,
``reduce_zero_label=True``). :class:`ADE20KLayoutDataset` keeps all of that and adds two things:

* folder checks when the data list is built: a missing image or label folder, an image folder
  without any image, or an image without its label PNG raises ``FileNotFoundError`` naming the
  path, instead of an empty dataset or a failure deep inside a dataloader worker;
* its own class list: ``metainfo=dict(classes=...)`` names the stored labels 1..K directly.
  (Given a class list other than ADE20K's 150 names, mmseg's class would instead build a
  ``label_map`` from ADE20K's indices and silently turn every other label into "ignore".)

With no ``metainfo`` it is ADE20K itself (150 classes), so real ADE20K configs may use it too.
"""
from __future__ import annotations

import os.path as osp
from typing import Optional, Sequence

from mmseg.datasets import ADE20KDataset

from ..registry import DATASETS
from .image_files import listed

__all__ = ['ADE20KLayoutDataset']


@DATASETS.register_module()
class ADE20KLayoutDataset(ADE20KDataset):
    """``ADE20KDataset`` whose folders are checked and whose ``classes`` name labels 1..K as stored.

    Takes ``ADE20KDataset``'s arguments (``data_root``, ``data_prefix=dict(img_path=...,
    seg_map_path=...)``, ``pipeline``, ``metainfo``, ...). ``metainfo['classes']`` (optional) is
    the list of K class names for stored labels 1..K; ``metainfo['palette']`` (optional) K RGB
    triples.
    """

    @classmethod
    def get_label_map(cls, new_classes: Optional[Sequence] = None) -> None:
        # The class list names the stored labels in order: no remapping, nothing silently ignored.
        return None

    def _update_palette(self) -> list:
        # mmseg merges ADE20K's 150 colours into a shorter class list and would then refuse the
        # mismatch; with no label_map the first K colours serve the K classes.
        palette = self._metainfo.get('palette', [])
        classes = self._metainfo.get('classes', [])
        if len(palette) > len(classes):
            return type(palette)(palette[:len(classes)])
        return super()._update_palette()

    def load_data_list(self) -> list[dict]:
        """List the samples after checking that the folders and every label PNG exist."""
        img_dir = self.data_prefix.get('img_path', '')
        ann_dir = self.data_prefix.get('seg_map_path', None)
        if self.backend_args is not None:
            # Remote storage (petrel, http...): os.path cannot see it; mmseg's listing decides.
            return super().load_data_list()
        if not self.ann_file:
            self._check_dir(img_dir, 'image')
        if ann_dir is not None:
            self._check_dir(ann_dir, 'label')
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f'no "*{self.img_suffix}" images in {img_dir!r}')
        missing = [info['seg_map_path'] for info in data_list
                   if 'seg_map_path' in info and not osp.isfile(info['seg_map_path'])]
        if missing:
            raise FileNotFoundError(f'{len(missing)} of {len(data_list)} images in {img_dir!r} '
                                    f'have no label PNG: {listed(missing)} do not exist')
        return data_list

    @staticmethod
    def _check_dir(path: str, what: str) -> None:
        if not osp.isdir(path):
            raise FileNotFoundError(f'{what} folder {path!r} does not exist (data_root joined with '
                                    f'data_prefix); expected the ADE20K layout '
                                    f'images/<split>/*.jpg and annotations/<split>/*.png')
