"""Checking a dataset config's files and folders before anything is built."""
from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ['check_dataset_paths']


def check_dataset_paths(dataset_cfg: Mapping[str, Any], where: str) -> None:
    """Raise FileNotFoundError if a dataset config names an annotation file or folder that is missing.

    Paths are resolved as mmengine's ``BaseDataset`` resolves them (relative to ``data_root``).
    Wrapper datasets (``dataset=``/``datasets=``) are checked recursively; remote paths
    (``scheme://``) are left to their file backend.

    Args:
        dataset_cfg: a dataset config.
        where: the config key it came from, for the message (e.g. ``'train_dataloader.dataset'``).
    """
    if 'dataset' in dataset_cfg and isinstance(dataset_cfg['dataset'], Mapping):
        check_dataset_paths(dataset_cfg['dataset'], f'{where}.dataset')
    for i, sub in enumerate(dataset_cfg.get('datasets') or []):
        if isinstance(sub, Mapping):
            check_dataset_paths(sub, f'{where}.datasets[{i}]')
    data_root = dataset_cfg.get('data_root') or ''
    if data_root and not _is_remote(data_root) and not os.path.isdir(data_root):
        raise FileNotFoundError(f'{where}.data_root={data_root!r} is not a directory')

    def resolve(path: str) -> str:
        return path if os.path.isabs(path) or not data_root else os.path.join(data_root, path)

    ann_file = dataset_cfg.get('ann_file')
    if isinstance(ann_file, str) and ann_file and not _is_remote(ann_file):
        if not os.path.isfile(resolve(ann_file)):
            raise FileNotFoundError(f'{where}.ann_file={ann_file!r} does not exist '
                                    f'(looked for {resolve(ann_file)!r})')
    prefixes = dataset_cfg.get('data_prefix') or {}
    if isinstance(prefixes, Mapping):
        for key, folder in prefixes.items():
            if isinstance(folder, str) and folder and not _is_remote(folder):
                if not os.path.isdir(resolve(folder)):
                    raise FileNotFoundError(f'{where}.data_prefix.{key}={folder!r} is not a directory '
                                            f'(looked for {resolve(folder)!r})')


def _is_remote(path: str) -> bool:
    return '://' in path
