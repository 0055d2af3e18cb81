"""The ``lightning=dict(...)`` section of a config: its keys, their checks and their defaults.

Every key is optional. :func:`check_lightning_section` checks every key and value before
anything is built, with messages that name the key, the value and what is allowed;
:class:`LightningSection` is the checked section as a frozen value, with the defaults filled
in. This module is the one place that knows the section's keys::

    lightning = dict(
        accelerator='auto', devices=1, num_nodes=1, strategy='auto',   # Trainer's own meaning
        precision=None,             # None: from optim_wrapper (AmpOptimWrapper -> '16-mixed' /
                                    # 'bf16-mixed'; '16-mixed' becomes 'bf16-mixed' on CPU), else '32-true'
        find_unused_parameters=False,   # DDP; also read from model_wrapper_cfg / find_unused_parameters
        nan_policy='raise',         # or 'skip': what a NaN/Inf training loss does (MMLightningModule)
        per_sample_seed=True,       # augmentation = f(seed, epoch, sample index) (MMDataModule)
        check_data=True,            # acmix_mm's checks on every COCO-family / mmseg dataset
                                    # (acmix_mm.datasets.checked_types)
        sync_bn='auto',             # 'auto' | 'keep' | 'revert' (MMLightningModule)
        log_every_n_steps=None,     # None: default_hooks.logger.interval, else 50
        num_sanity_val_steps=0,     # mmengine's Runner runs no sanity check
        enable_progress_bar=True,
        checkpoint=dict(save_last=True, save_top_k=None, monitor=None, mode=None),
                                    # None: from default_hooks.checkpoint (max_keep_ckpts, save_best, rule)
        loggers=('tensorboard', 'csv'),
        trainer_kwargs=dict(),      # passed to lightning.pytorch.Trainer as they are
    )
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from ..registry import unknown_keys_message

__all__ = ['LightningSection', 'check_lightning_section', 'LIGHTNING_KEYS', 'CHECKPOINT_KEYS', 'ACCELERATORS',
           'PRECISIONS', 'NAN_POLICIES', 'SYNC_BN_MODES', 'LOGGERS']

CHECKPOINT_KEYS = ('save_last', 'save_top_k', 'monitor', 'mode')
ACCELERATORS = ('auto', 'cpu', 'gpu', 'cuda', 'mps', 'tpu')
PRECISIONS = ('32', '32-true', '16-mixed', 'bf16-mixed', '64', '64-true', 'bf16-true', '16-true')
NAN_POLICIES = ('raise', 'skip')
SYNC_BN_MODES = ('auto', 'keep', 'revert')
LOGGERS = ('tensorboard', 'csv')


@dataclasses.dataclass(frozen=True)
class LightningSection:
    """The checked ``lightning`` section, defaults filled in (the module docstring lists them).

    ``precision`` and ``find_unused_parameters`` stay None when the section does not set them:
    :class:`~acmix_mm.lightning.spec.RunSpec` then derives them from the rest of the config.
    ``checkpoint`` and ``trainer_kwargs`` are read-only mappings.
    """

    accelerator: Any = 'auto'
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = 'auto'
    precision: Optional[str] = None
    find_unused_parameters: Optional[bool] = None
    nan_policy: str = 'raise'
    per_sample_seed: bool = True
    check_data: bool = True
    sync_bn: str = 'auto'
    log_every_n_steps: Optional[int] = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    checkpoint: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    loggers: Tuple[str, ...] = LOGGERS
    trainer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

    @classmethod
    def from_config(cls, section: Any) -> 'LightningSection':
        """Check ``section`` (:func:`check_lightning_section`) and fill in the defaults."""
        values = check_lightning_section(section)
        if values.get('precision') is not None:
            values['precision'] = str(values['precision'])
        if 'loggers' in values:
            names = values['loggers']
            values['loggers'] = (names,) if isinstance(names, str) else tuple(names)
        for key in ('checkpoint', 'trainer_kwargs'):
            values[key] = types.MappingProxyType(dict(values.get(key) or {}))
        return cls(**values)


# What the section may hold: the fields above, defined once.
LIGHTNING_KEYS = tuple(f.name for f in dataclasses.fields(LightningSection))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_devices(value: Any) -> None:
    """Lightning's ``devices``: 'auto', an int >= -1 (-1: all), '2' / '-1' / '0,1', or a list of ids."""
    allowed = ("'auto', an int >= 1 (how many), -1 (all), a string such as '2' or '0,1', "
               'or a list of device ids such as [0, 1]')
    if value == 'auto' or (_is_int(value) and (value >= 1 or value == -1)):
        return
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().rstrip(',').split(',')]
        if parts and all(p.lstrip('-').isdigit() for p in parts) and (len(parts) > 1 or int(parts[0]) != 0):
            return
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value) \
            and len(set(value)) == len(value):
        return
    raise ValueError(f'lightning.devices={value!r} is not valid; allowed: {allowed}')


def _check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f'lightning.{key}={value!r} is not supported; allowed: {", ".join(map(repr, choices))}')


def _check_type(key: str, value: Any, types: tuple, what: str) -> None:
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise TypeError(f'lightning.{key} must be {what}, got {value!r} ({type(value).__name__})')


def check_lightning_section(section: Any) -> Dict[str, Any]:
    """Check the ``lightning=dict(...)`` section and return it as a plain dict.

    Every key is optional. Unknown keys raise naming the closest allowed key; values are checked
    against what Lightning (``accelerator``, ``devices``, ``num_nodes``, ``precision``...) and
    acmix_mm (``nan_policy``, ``sync_bn``, ``checkpoint``, ``loggers``) accept, so that a bad
    value fails before the model, the data or any output is built.

    Args:
        section: the section (None: an empty one).

    Raises:
        TypeError: the section or a value has the wrong type (a list where a dict belongs...).
        ValueError: an unknown key, or a value outside what is allowed.
    """
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise TypeError(f'the lightning section must be a dict, e.g. lightning=dict(devices=2), got a '
                        f'{type(section).__name__}: {section!r:.200}')
    section = dict(section)
    unknown = [k for k in section if k not in LIGHTNING_KEYS]
    if unknown:
        raise ValueError(unknown_keys_message('lightning=dict(...)', unknown, LIGHTNING_KEYS, noun='key'))
    if 'accelerator' in section and isinstance(section['accelerator'], str):
        _check_choice('accelerator', section['accelerator'], ACCELERATORS)
    if 'devices' in section:
        _check_devices(section['devices'])
    if 'num_nodes' in section and (not _is_int(section['num_nodes']) or section['num_nodes'] < 1):
        raise ValueError(f'lightning.num_nodes must be an int >= 1, got {section["num_nodes"]!r}')
    if section.get('precision') is not None:
        _check_choice('precision', str(section['precision']), PRECISIONS)
    for key in ('find_unused_parameters', 'enable_progress_bar', 'per_sample_seed', 'check_data'):
        if key in section:
            _check_type(key, section[key], (bool,), 'True or False')
    if 'nan_policy' in section:
        _check_choice('nan_policy', section['nan_policy'], NAN_POLICIES)
    if 'sync_bn' in section:
        _check_choice('sync_bn', section['sync_bn'], SYNC_BN_MODES)
    if section.get('log_every_n_steps') is not None:
        value = section['log_every_n_steps']
        if not _is_int(value) or value < 1:
            raise ValueError(f'lightning.log_every_n_steps must be None or an int >= 1, got {value!r}')
    if 'num_sanity_val_steps' in section:
        value = section['num_sanity_val_steps']
        if not _is_int(value) or value < -1:
            raise ValueError(f'lightning.num_sanity_val_steps must be an int >= -1 (-1: all), got {value!r}')
    if section.get('checkpoint') is not None:
        _check_checkpoint(section['checkpoint'])
    if 'loggers' in section:
        names = section['loggers']
        names = [names] if isinstance(names, str) else names
        _check_type('loggers', names, (list, tuple), f'a name or a list of names from {LOGGERS}')
        for name in names:
            _check_choice('loggers', name, LOGGERS)
    if section.get('trainer_kwargs') is not None:
        _check_type('trainer_kwargs', section['trainer_kwargs'], (Mapping,),
                    'a dict of lightning.pytorch.Trainer arguments')
    return section


def _check_checkpoint(options: Any) -> None:
    _check_type('checkpoint', options, (Mapping,), f'a dict with keys from {CHECKPOINT_KEYS}')
    unknown = [k for k in options if k not in CHECKPOINT_KEYS]
    if unknown:
        raise ValueError(unknown_keys_message('lightning.checkpoint', unknown, CHECKPOINT_KEYS, noun='key'))
    if 'save_last' in options and options['save_last'] not in (True, False, 'link'):
        raise ValueError(f"lightning.checkpoint.save_last must be True, False or 'link', got {options['save_last']!r}")
    top_k = options.get('save_top_k')
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise ValueError(f'lightning.checkpoint.save_top_k must be None or an int >= -1 (-1: all), got {top_k!r}')
    if options.get('monitor') is not None:
        _check_type('checkpoint.monitor', options['monitor'], (str,), 'a metric name (str) or None')
    if options.get('mode') is not None:
        _check_choice('checkpoint.mode', options['mode'], ('min', 'max'))
