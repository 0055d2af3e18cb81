"""Resumable, reproducible training data, and the global random states a checkpoint keeps.

What :meth:`MMDataModule.train_dataloader <acmix_mm.lightning.MMDataModule.train_dataloader>` returns
is a :class:`ResumableDataLoader`:

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

:func:`collect_rng_states` / :func:`restore_rng_states` put the global generators of torch,
numpy and Python into a checkpoint as plain data and back.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ['sample_seed', 'seeded_global_rngs', 'SeededDataset', 'ResumableBatchSampler', 'ResumableDataLoader',
           'collect_rng_states', 'restore_rng_states']


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


def collect_rng_states() -> Dict[str, Any]:
    """The global random states of torch (CPU and every CUDA device), numpy and Python, as plain
    data (tensors, ints, floats, lists), so that ``torch.load(weights_only=True)`` reads them."""
    np_key, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states: Dict[str, Any] = {
        'torch': torch.get_rng_state(),
        'numpy': {'key': str(np_key), 'state': torch.from_numpy(np_keys.astype(np.int64)),
                  'pos': int(np_pos), 'has_gauss': int(np_has_gauss), 'cached_gaussian': float(np_gauss)},
        'python': {'version': int(py_version), 'state': [int(v) for v in py_internal],
                   'gauss_next': None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global generators to ``states`` (from :func:`collect_rng_states`).

    CUDA states are restored when the checkpoint holds one per visible device; otherwise
    (another GPU count, or a CPU run) the CUDA generators keep their seeding.
    """
    torch.set_rng_state(torch.as_tensor(states['torch'], dtype=torch.uint8).cpu())
    np_state = states['numpy']
    np.random.set_state((np_state['key'], np.asarray(np_state['state'], dtype=np.int64).astype(np.uint32),
                         int(np_state['pos']), int(np_state['has_gauss']), float(np_state['cached_gaussian'])))
    py_state = states['python']
    random.setstate((int(py_state['version']), tuple(int(v) for v in py_state['state']), py_state['gauss_next']))
    cuda: Optional[List[torch.Tensor]] = states.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(t, dtype=torch.uint8).cpu() for t in cuda])
