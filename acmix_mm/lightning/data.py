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

Resumable, reproducible training data (:class:`ResumableDataLoader`, what ``train_dataloader``
returns):

* **Mid-epoch resume.** The loader is *stateful* in Lightning's sense (``state_dict`` /
  ``load_state_dict``): it records the epoch and how many batches of it the loop has taken, and a
  resumed run skips those batches at the index level (their images are never loaded), so the
  epoch continues with the batch that follows the checkpoint instead of restarting.
* **Augmentation as a pure function of (seed, epoch, sample index)** (``lightning.per_sample_seed``,
  default True). mmdet/mmseg transforms draw from the global ``random`` / ``numpy.random`` /
  ``torch`` generators. The batch sampler hands each index together with a seed derived from the
  run's seed, the epoch and the index; :class:`SeededDataset` seeds the three generators with it
  around the pipeline call and puts the caller's states back afterwards. A sample's augmentation
  then does not depend on which worker loads it, on ``num_workers``, on what was loaded before,
  or on a resume; and the main process's generators (dropout, RoI sampling) are untouched by data
  loading. With ``per_sample_seed=False`` transforms draw from the generators as under mmengine's
  Runner (bit-identical data to the Runner's); a resume is then exact only with ``num_workers=0``.
* **The iterator is created at the first batch**, after Lightning has called ``set_epoch``, so
  workers (which prefetch as soon as they start) never read the previous epoch's order. Creating a
  DataLoader iterator draws one number from torch's global generator (every epoch, or once per
  run with ``persistent_workers``); this loader draws it at every epoch start, whatever the worker
  settings, and not when it continues a resumed epoch, so the global random stream, and with it
  dropout and RoI sampling, continues after a resume as if the run had never stopped. (With
  ``persistent_workers=True`` this is one draw per epoch more than mmengine's Runner makes.)
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from lightning.pytorch import LightningDataModule
from mmengine.config import Config, ConfigDict
from mmengine.dist import sync_random_seed
from mmengine.evaluator import Evaluator
from mmengine.registry import DATASETS, EVALUATOR, init_default_scope
from mmengine.runner import Runner
from torch.utils.data import DataLoader, Dataset, Sampler

from ..datasets.validation import build_dataset, validate_dataset
from .config import ConfigLike, as_config

SPLITS = ('train', 'val', 'test')
_EVAL_SAMPLERS = ('DefaultSampler', 'mmengine.DefaultSampler')
_INFINITE_SAMPLERS = ('InfiniteSampler', 'mmengine.InfiniteSampler')


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


# -- resumable, reproducible training data (module docstring) -------------------------------------
_SEED_MASK = (1 << 63) - 1
_LOADER_SEED_INDEX = 1 << 40  # no sample has this index: the seed of a loader's own generator


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index`` in ``epoch`` of a run seeded with ``base_seed`` (a uint32).

    A pure function (numpy's ``SeedSequence`` hashes the three numbers), so any process computes
    the same seed for the same sample, and neighbouring samples get unrelated streams.
    """
    entropy = [int(base_seed) & _SEED_MASK, int(epoch), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed ``random``, ``numpy.random`` and torch's CPU generator with ``seed`` inside the block,
    and put back the states they had before it (CUDA generators are not touched)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


class SeededDataset(Dataset):
    """Wrap a map-style dataset so that ``dataset[(index, seed)]`` runs its pipeline seeded.

    A plain ``dataset[index]`` passes through unchanged. Attributes not defined here
    (``metainfo``, ``get_data_info``, ...) are the wrapped dataset's.

    Args:
        dataset: the dataset (e.g. an mmengine ``BaseDataset``).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            with seeded_global_rngs(seed):
                return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        if name == 'dataset':  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableBatchSampler(Sampler):
    """What a :class:`ResumableDataLoader` iterates: the config's batch sampler, able to skip the
    first batches of a pass, with every index paired with its sample seed.

    Args:
        batch_sampler: the config's batch sampler (torch ``BatchSampler`` over mmengine's
            ``DefaultSampler``, or e.g. mmdet's ``AspectRatioBatchSampler``).
        index_sampler: the sampler whose ``epoch`` says which epoch a pass is (``DefaultSampler``;
            Lightning calls its ``set_epoch``). Without an int ``epoch`` attribute, passes are
            counted instead.
        base_seed: the run's data seed; None: yield plain indices (no per-sample seeding).

    Yields lists of ``(index, seed)`` pairs (plain indices when ``base_seed`` is None).
    """

    def __init__(self, batch_sampler: Any, index_sampler: Any, base_seed: Optional[int]):
        self.batch_sampler = batch_sampler
        self.index_sampler = index_sampler
        self.base_seed = base_seed
        self.next_pass = 0  # epoch of the next pass, for samplers without an epoch
        self._skip = 0
        self._epoch = 0

    def pass_epoch(self) -> int:
        """The epoch of the pass about to start (advances the pass count of epoch-less samplers)."""
        epoch = getattr(self.index_sampler, 'epoch', None)
        if isinstance(epoch, (int, np.integer)) and not isinstance(epoch, bool):
            return int(epoch)
        epoch, self.next_pass = self.next_pass, self.next_pass + 1
        return epoch

    def skip_next(self, batches: int, epoch: int) -> None:
        """Drop the first ``batches`` batches of the next pass, of epoch ``epoch`` (indices only:
        nothing is loaded)."""
        self._skip = int(batches)
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[List[Any]]:
        skip, self._skip = self._skip, 0
        epoch = self._epoch
        for i, batch in enumerate(self.batch_sampler):
            if i < skip:
                continue
            if self.base_seed is None:
                yield list(batch)
            else:
                yield [(index, sample_seed(self.base_seed, epoch, index)) for index in batch]


class _LazyIterator:
    """What ``iter(ResumableDataLoader)`` returns: the real iterator starts at the first batch."""

    def __init__(self, loader: 'ResumableDataLoader'):
        self._loader = loader
        self._iterator: Optional[Iterator] = None

    def __iter__(self) -> '_LazyIterator':
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._loader._start()
        batch = next(self._iterator)
        self._loader.batches_taken += 1
        return batch

    def __len__(self) -> int:
        return len(self._loader)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that Lightning can checkpoint and resume mid-epoch.

    Args: those of ``DataLoader`` (with a ``batch_size`` or a ``batch_sampler``), and
        index_sampler: the sampler that knows the epoch (default: ``batch_sampler.sampler``);
        base_seed: the per-sample seed base (the dataset is wrapped in :class:`SeededDataset`);
            None: no per-sample seeding.

    Usually built with :meth:`wrap` from the DataLoader mmengine's ``Runner.build_dataloader`` makes:
    ``sampler``, ``batch_sampler``, workers, collate and worker seeding stay what they were; the
    loader iterates them through a :class:`ResumableBatchSampler` (``resumable_sampler``).
    ``state_dict()`` = ``{'epoch', 'batches', 'base_seed', 'sampler_seed'}``: the epoch, the
    batches of it the loop has taken (counted as they are handed out: Lightning does not prefetch
    from a sized loader), the per-sample seed base and the index sampler's shuffle seed.
    ``load_state_dict`` makes the next pass of that same epoch skip those batches; a pass of
    another epoch is not affected.
    """

    @classmethod
    def wrap(cls, loader: DataLoader, base_seed: Optional[int]) -> 'ResumableDataLoader':
        """Rebuild ``loader`` (same samplers, workers, collate, worker init, ...) as resumable.

        Args:
            loader: a DataLoader with a batch size or a batch sampler.
            base_seed: the per-sample seed base; None disables per-sample seeding.
        """
        if loader.batch_sampler is None:
            raise ValueError('the training DataLoader has no batch_sampler (batch_size=None); '
                             'resumable training needs batches of indices')
        kwargs: Dict[str, Any] = dict(
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device)
        if loader.batch_size is not None:  # DataLoader made the BatchSampler itself: again
            kwargs.update(sampler=loader.sampler, batch_size=loader.batch_size, drop_last=loader.drop_last)
            index_sampler = loader.sampler
        else:
            kwargs.update(batch_sampler=loader.batch_sampler)
            index_sampler = getattr(loader.batch_sampler, 'sampler', loader.sampler)
        if loader.num_workers > 0:
            kwargs['prefetch_factor'] = loader.prefetch_factor
        if hasattr(loader, 'in_order'):
            kwargs['in_order'] = loader.in_order
        return cls(loader.dataset, index_sampler=index_sampler, base_seed=base_seed, **kwargs)

    def __init__(self, dataset: Dataset, *args: Any, index_sampler: Any = None,
                 base_seed: Optional[int] = None, **kwargs: Any):
        if base_seed is not None and not isinstance(dataset, SeededDataset):
            dataset = SeededDataset(dataset)  # the batches hold (index, seed) pairs
        super().__init__(dataset, *args, **kwargs)
        if self.batch_sampler is None:
            raise ValueError('ResumableDataLoader needs batches (batch_size or batch_sampler)')
        index_sampler = index_sampler if index_sampler is not None else getattr(self.batch_sampler, 'sampler', None)
        self.resumable_sampler = ResumableBatchSampler(self.batch_sampler, index_sampler, base_seed)
        self.batches_taken = 0   # batches of the current epoch handed to the loop
        self._taken_epoch = 0
        self._pending: Optional[Tuple[int, int]] = None  # (epoch, batches) to skip on resume
        self._user_generator = self.generator

    @property
    def _index_sampler(self):  # what torch's DataLoader iterates and measures (len)
        return self.resumable_sampler

    def __iter__(self) -> _LazyIterator:  # type: ignore[override]
        return _LazyIterator(self)

    def _start(self) -> Iterator:
        """Create the real iterator (first batch of a pass): apply a pending skip, draw the seed."""
        epoch = self.resumable_sampler.pass_epoch()
        skip = 0
        if self._pending is not None:
            pending_epoch, pending_batches = self._pending
            self._pending = None
            if pending_epoch == epoch:
                skip = pending_batches
        self.resumable_sampler.skip_next(skip, epoch)
        self.batches_taken = skip
        self._taken_epoch = epoch
        # DataLoader draws one number from torch's global generator when it creates an iterator
        # (every epoch; once per run with persistent workers). Draw it at every epoch start and
        # never when continuing a resumed epoch, so that the global stream (dropout, RoI
        # sampling) is that of an uninterrupted run and does not depend on the worker settings.
        if skip == 0:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        else:
            seed = sample_seed(self.resumable_sampler.base_seed or 0, epoch, _LOADER_SEED_INDEX)
        persistent = self.persistent_workers and self.num_workers > 0
        if not (persistent and self._iterator is not None):  # a new iterator will be created
            self.generator = (self._user_generator if self._user_generator is not None
                              else torch.Generator().manual_seed(seed))
        return super().__iter__()

    def state_dict(self) -> Dict[str, Any]:
        sampler_seed = getattr(self.resumable_sampler.index_sampler, 'seed', None)
        return {'epoch': int(self._taken_epoch), 'batches': int(self.batches_taken),
                'base_seed': self.resumable_sampler.base_seed,
                'sampler_seed': int(sampler_seed) if isinstance(sampler_seed, (int, np.integer)) else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted({'epoch', 'batches'} - set(state))
        if missing:
            raise ValueError(f'the training dataloader state lacks {", ".join(missing)}: {dict(state)!r}')
        epoch, batches = int(state['epoch']), int(state['batches'])
        self._pending = (epoch, batches)
        resumable = self.resumable_sampler
        # Epoch-less samplers: the next pass continues this epoch, or starts the next one.
        resumable.next_pass = epoch if batches < len(self) else epoch + 1
        if state.get('base_seed') is not None and resumable.base_seed is not None:
            resumable.base_seed = int(state['base_seed'])
        if state.get('sampler_seed') is not None and hasattr(resumable.index_sampler, 'seed'):
            resumable.index_sampler.seed = int(state['sampler_seed'])


class MMDataModule(LightningDataModule):
    """Dataloaders and evaluators of ``{train,val,test}_dataloader`` / ``{val,test}_evaluator``.

    Args:
        cfg: an mmengine config (object, dict or path).
        seed: the seed for samplers and dataloader workers (mmengine's ``randomness.seed``);
            None reads ``cfg.randomness.seed`` and, without one, lets each sampler draw a
            seed shared across ranks, as mmengine does.

    Attributes (after :meth:`setup`):
        datasets: ``{'train'|'val'|'test': Dataset}`` for the splits of the stage.
        evaluators: ``{'val'|'test': Evaluator}``, each with its dataset's ``dataset_meta``.
    """

    def __init__(self, cfg: ConfigLike, seed: Optional[int] = None):
        super().__init__()
        self.cfg: Config = as_config(cfg)
        if seed is None:
            seed = (self.cfg.get('randomness') or {}).get('seed')
        self.seed = seed
        per_sample_seed = (self.cfg.get('lightning') or {}).get('per_sample_seed', True)
        if not isinstance(per_sample_seed, bool):
            raise ValueError(f'lightning.per_sample_seed={per_sample_seed!r}; allowed: True, False')
        self.per_sample_seed = per_sample_seed
        self.datasets: Dict[str, Dataset] = {}
        self.evaluators: Dict[str, Evaluator] = {}

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
        diff_rank_seed = bool((self.cfg.get('randomness') or {}).get('diff_rank_seed', False))
        return Runner.build_dataloader(ConfigDict(loader_cfg), seed=self.seed, diff_rank_seed=diff_rank_seed)

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
        return self.build_dataloader('val')

    def test_dataloader(self) -> DataLoader:
        return self.build_dataloader('test')

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
