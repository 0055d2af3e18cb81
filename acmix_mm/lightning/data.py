"""MMDataModule: the datasets, dataloaders and evaluators of an mmengine config, for Lightning.

Everything is built through mmengine's registries under the config's ``default_scope``
(datasets and transforms from ``DATASETS``/``TRANSFORMS``, samplers from ``DATA_SAMPLERS``,
``collate_fn`` from ``FUNCTIONS``, metrics from ``METRICS``), with mmengine's own
``Runner.build_dataloader`` so that batch size, workers, ``persistent_workers``, the sampler's
``shuffle``/seed, a ``batch_sampler`` such as mmdet's ``AspectRatioBatchSampler`` and the
worker seeding behave exactly as under mmengine's Runner.

Distributed evaluation: Lightning's DistributedSampler (and mmengine's ``DefaultSampler`` with
its default ``round_up=True``) pads the evaluation set so that every rank gets as many
samples, which would score duplicated images. Evaluation samplers are therefore built with
``round_up=False``: rank r reads indices r, r + W, r + 2W, ... and nothing is repeated.
mmengine's ``Evaluator.evaluate(size)`` gathers the per-rank results with ``collect_results``,
which interleaves them back in rank order (``zip_longest``) and truncates to ``size``, so the
metric sees every image exactly once and in dataset order, computes on rank 0, and broadcasts.
The Trainer must be built with ``use_distributed_sampler=False`` (see ``trainer.py``).

Training data is resumable and seeded per sample: see :mod:`acmix_mm.lightning.resumable`.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

import torch
from lightning.pytorch import LightningDataModule
from mmengine.config import Config, ConfigDict
from mmengine.dist import sync_random_seed
from mmengine.evaluator import Evaluator
from mmengine.registry import EVALUATOR, init_default_scope
from mmengine.runner import Runner
from torch.utils.data import DataLoader, Dataset

from ..datasets.checked_types import with_data_checks
from ..datasets.paths import check_dataset_paths
from ..datasets.validation import build_dataset, validate_dataset
from .config import ConfigLike, as_config
from .resumable import ResumableDataLoader
from .spec import RunSpec

SPLITS = ('train', 'val', 'test')
_EVAL_SAMPLERS = ('DefaultSampler', 'mmengine.DefaultSampler')
_INFINITE_SAMPLERS = ('InfiniteSampler', 'mmengine.InfiniteSampler')


def check_loader_numbers(loader_cfg: Mapping[str, Any], key: str) -> None:
    """Raise ``ValueError`` naming ``<key>.batch_size`` (an int >= 1) or ``<key>.num_workers``
    (an int >= 0) when the value is out of range; torch would fail inside ``trainer.fit``."""
    for name, low in (('batch_size', 1), ('num_workers', 0)):
        if name not in loader_cfg:
            continue
        value = loader_cfg[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f'{key}.{name}={value!r} must be an integer >= {low}')


def build_evaluator(evaluator_cfg: Any, dataset: Dataset, where: str) -> Evaluator:
    """Build an mmengine ``Evaluator`` from ``val_evaluator``/``test_evaluator`` for ``dataset``."""
    if isinstance(evaluator_cfg, Evaluator):
        evaluator = evaluator_cfg
    elif isinstance(evaluator_cfg, Mapping) and 'metrics' in evaluator_cfg:
        evaluator = EVALUATOR.build(ConfigDict(copy.deepcopy(dict(evaluator_cfg))))
    elif isinstance(evaluator_cfg, (Mapping, list, tuple)):
        metrics = evaluator_cfg
        if isinstance(metrics, Mapping):
            metrics = ConfigDict(copy.deepcopy(dict(metrics)))
        else:
            metrics = [ConfigDict(copy.deepcopy(dict(m))) for m in metrics]
        evaluator = Evaluator(metrics)
    else:
        raise TypeError(f'{where} must be a metric dict, a list of them or an Evaluator, '
                        f'got {type(evaluator_cfg).__name__}')
    if hasattr(dataset, 'metainfo'):
        evaluator.dataset_meta = dataset.metainfo
    return evaluator


class MMDataModule(LightningDataModule):
    """Dataloaders and evaluators of ``{train,val,test}_dataloader`` / ``{val,test}_evaluator``.

    Args:
        cfg: an mmengine config (object, dict or path).
        spec: the parsed run (:class:`~acmix_mm.lightning.spec.RunSpec`): its ``seed`` seeds
            samplers and dataloader workers (without one, each sampler draws a seed shared
            across ranks, as mmengine does), its ``lightning.per_sample_seed`` picks per-sample
            augmentation seeds. None parses ``cfg`` (:meth:`RunSpec.default_for`).
        seed: without ``spec``, the seed to use instead of ``randomness.seed``.

    Attributes (after :meth:`setup`):
        datasets: ``{'train'|'val'|'test': Dataset}`` for the splits of the stage.
        evaluators: ``{'val'|'test': Evaluator}``, each with its dataset's ``dataset_meta``.
    """

    def __init__(self, cfg: ConfigLike, spec: Optional[RunSpec] = None, seed: Optional[int] = None):
        super().__init__()
        self.cfg: Config = as_config(cfg)
        if spec is not None and seed is not None:
            raise ValueError('give MMDataModule a spec or a seed, not both (the spec holds the seed)')
        self.spec: RunSpec = spec if spec is not None else RunSpec.default_for(self.cfg, seed=seed)
        self.datasets: Dict[str, Dataset] = {}
        self.evaluators: Dict[str, Evaluator] = {}

    @property
    def seed(self) -> Optional[int]:
        return self.spec.seed

    @property
    def per_sample_seed(self) -> bool:
        return self.spec.lightning.per_sample_seed

    # -- building -------------------------------------------------------------------------------
    def splits_for(self, stage: Optional[str]) -> tuple:
        """The splits a Lightning stage needs: fit -> train (+ val if configured), etc."""
        if stage == 'fit':
            return ('train', 'val') if self.has_split('val') else ('train',)
        if stage == 'validate':
            return ('val',)
        if stage in ('test', 'predict'):
            return ('test',)
        return tuple(s for s in SPLITS if self.has_split(s))

    def has_split(self, split: str) -> bool:
        return bool(self.cfg.get(f'{split}_dataloader'))

    def check(self, stage: Optional[str]) -> None:
        """Validate every config piece a stage needs, before anything is built."""
        for split in self.splits_for(stage):
            key = f'{split}_dataloader'
            loader_cfg = self.cfg.get(key)
            if not loader_cfg:
                raise ValueError(f'the config has no {key}, which stage {stage!r} needs')
            if 'dataset' not in loader_cfg:
                raise ValueError(f'{key} has no dataset')
            check_loader_numbers(loader_cfg, key)
            if isinstance(loader_cfg['dataset'], Mapping):
                check_dataset_paths(loader_cfg['dataset'], f'{key}.dataset')
            if split != 'train' and not self.cfg.get(f'{split}_evaluator'):
                raise ValueError(f'{key} is set but the config has no {split}_evaluator: '
                                 f'evaluation needs one (e.g. {split}_evaluator=dict(type=\'CocoMetric\', '
                                 "ann_file=..., metric='bbox')) or remove the dataloader")

    def setup(self, stage: Optional[str] = None) -> None:
        self.check(stage)
        scope = self.cfg.get('default_scope')
        if scope:
            init_default_scope(scope)
        for split in self.splits_for(stage):
            if split in self.datasets:
                continue
            dataset_cfg = self.cfg[f'{split}_dataloader']['dataset']
            where = f'{split}_dataloader.dataset'
            if isinstance(dataset_cfg, Mapping):
                if self.spec.lightning.check_data:
                    dataset_cfg = with_data_checks(dataset_cfg)
                dataset = build_dataset(dataset_cfg, where)  # an empty dataset raises naming its files
            else:
                dataset = dataset_cfg
                if hasattr(dataset, 'full_init'):
                    dataset.full_init()
                validate_dataset(dataset, where)
            self.datasets[split] = dataset
            if split != 'train':
                self.evaluators[split] = build_evaluator(self.cfg[f'{split}_evaluator'], dataset,
                                                         f'{split}_evaluator')

    def build_dataloader(self, split: str) -> DataLoader:
        """A DataLoader of ``split``, built by mmengine's ``Runner.build_dataloader``."""
        if split not in self.datasets:
            self.setup({'train': 'fit', 'val': 'validate', 'test': 'test'}[split])
        loader_cfg = copy.deepcopy(dict(self.cfg[f'{split}_dataloader']))
        loader_cfg['dataset'] = self.datasets[split]
        loader_cfg.setdefault('sampler', dict(type='DefaultSampler', shuffle=split == 'train'))
        if split == 'train' and loader_cfg['sampler'].get('type') in _INFINITE_SAMPLERS:
            # mmengine's InfiniteSampler (mmseg's iteration-based configs) iterates one generator
            # for its lifetime; Lightning re-iterates the dataloader every epoch and closes the
            # previous iterator, which closes that generator: every later epoch would be empty.
            # DefaultSampler with the same shuffle/seed reshuffles per epoch (Lightning calls
            # set_epoch), which serves max_steps just as well.
            sampler = dict(loader_cfg['sampler'])
            sampler['type'] = 'DefaultSampler'
            loader_cfg['sampler'] = sampler
        if split != 'train':
            sampler = dict(loader_cfg['sampler'])
            if sampler.get('type') in _EVAL_SAMPLERS:
                sampler['round_up'] = False  # no padded duplicates in evaluation (module docstring)
            else:
                raise ValueError(f'{split}_dataloader.sampler.type={sampler.get("type")!r}: evaluation '
                                 'needs DefaultSampler (it shards without padding)')
            loader_cfg['sampler'] = sampler
        if not loader_cfg.get('num_workers'):
            # torch refuses persistent workers without workers; configs often set both.
            loader_cfg.pop('persistent_workers', None)
        return Runner.build_dataloader(ConfigDict(loader_cfg), seed=self.seed,
                                       diff_rank_seed=self.spec.diff_rank_seed)

    def train_dataloader(self) -> ResumableDataLoader:
        """The training loader as a :class:`ResumableDataLoader` (see the module docstring)."""
        loader = self.build_dataloader('train')
        base_seed = None
        if self.per_sample_seed:
            # Without randomness.seed, one random base shared by every rank (mmengine's way of
            # seeding samplers); a resume reads it back from the loader's state.
            base_seed = int(self.seed) if self.seed is not None else int(sync_random_seed())
        return ResumableDataLoader.wrap(loader, base_seed)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_dataloader('val')

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_dataloader('test')

    def _evaluation_dataloader(self, split: str) -> DataLoader:
        """An evaluation loader that never draws from torch's global generator.

        A DataLoader without its own generator draws its workers' base seed from the global one
        each time it creates an iterator: at every validation, or once per process with
        ``persistent_workers``. Training draws from that generator too (RPN/RoI sampling,
        dropout), so a resumed process, whose first validation creates the iterator again, would
        otherwise make one draw more than the uninterrupted run and diverge from there.
        """
        loader = self.build_dataloader(split)
        loader.generator = torch.Generator().manual_seed(int(self.seed or 0))
        return loader

    def evaluator(self, split: str) -> Evaluator:
        """The evaluator of ``'val'`` or ``'test'`` (built in :meth:`setup`)."""
        if split not in self.evaluators:
            self.setup({'val': 'validate', 'test': 'test'}[split])
        return self.evaluators[split]

    def dataset_meta(self) -> Optional[dict]:
        """The ``metainfo`` of the first built dataset (classes, palette, ...), for checkpoints."""
        for split in SPLITS:
            dataset = self.datasets.get(split)
            if dataset is not None and hasattr(dataset, 'metainfo'):
                return dict(dataset.metainfo)
        return None
