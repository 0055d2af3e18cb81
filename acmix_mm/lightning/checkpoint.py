"""Checkpoint layout shared by Lightning and mmengine, and safe loading of model weights.

A checkpoint written through :class:`~acmix_mm.lightning.MMLightningModule` is at once

* a Lightning checkpoint (``trainer.fit(ckpt_path=...)`` resumes from it), and
* an mmengine/mmdet/mmseg checkpoint: ``state_dict`` holds the wrapped model's own keys
  (``backbone.conv1.weight``, not ``model.backbone.conv1.weight``) and ``meta`` holds
  ``dataset_meta``, so ``mmengine.runner.load_checkpoint(model, path)`` and
  ``mmdet.apis.init_detector(cfg, path)`` load it with their default arguments.

The module strips the ``model.`` prefix when saving and puts it back when Lightning loads
(``STATE_DICT_LAYOUT`` marks such files). Everything else in the file is plain data
(:func:`~acmix_mm.lightning.config.to_plain`), so ``torch.load(weights_only=True)`` reads it:
loading a checkpoint never runs code from it.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..models.checkpoint import CheckpointError, check_state_dict_fits, display_global, safe_load

log = logging.getLogger(__name__)

STATE_DICT_LAYOUT_KEY = 'state_dict_layout'
STATE_DICT_LAYOUT = 'mmengine'
MODEL_PREFIX = 'model.'


def strip_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> 'collections.OrderedDict':
    """``model.x`` -> ``x`` (keys without the prefix are kept as they are), metadata included."""
    out = collections.OrderedDict(
        (k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(
            (k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else ('' if k == 'model' else k), v)
            for k, v in metadata.items())
    return out


def add_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> 'collections.OrderedDict':
    """``x`` -> ``model.x``: the keys of the LightningModule that wraps the model."""
    out = collections.OrderedDict((MODEL_PREFIX + k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(
            ((MODEL_PREFIX + k) if k else 'model', v) for k, v in metadata.items())
    return out


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read a checkpoint with acmix_mm's one safe reader (nothing in the file is executed).

    :func:`acmix_mm.models.checkpoint.safe_load` does the reading, so ``tools/test.py``,
    ``--resume``, ``load_from`` and the backbones' ``Pretrained`` init give the same message for
    the same bad file (numpy data in mmengine's ``meta`` is accepted, see there).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError (a ValueError): empty, truncated, corrupt, non-torch or unsafe file, or
            a file that holds no dict.
    """
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a dict '
                              'of a model checkpoint (state_dict, meta, ...)')
    return dict(checkpoint)


def model_state_dict(checkpoint: Mapping[str, Any], path: str = '<checkpoint>') -> 'collections.OrderedDict':
    """The wrapped model's weights from a checkpoint of any of the layouts we meet.

    Accepts our layout, a Lightning checkpoint of a module holding the model as ``model``,
    an mmengine checkpoint (``state_dict`` or ``model`` key), or a bare state dict.

    Raises:
        CheckpointError: no mapping of tensors under ``state_dict``, ``model`` or the top level.
    """
    for key in ('state_dict', 'model'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state_dict = checkpoint[key]
            break
    else:
        state_dict = checkpoint
    if checkpoint.get(STATE_DICT_LAYOUT_KEY) != STATE_DICT_LAYOUT and state_dict and all(
            k.startswith(MODEL_PREFIX) for k in state_dict):
        state_dict = strip_model_prefix(state_dict)
    # DDP-wrapped saves (mmengine's MMDistributedDataParallel) carry a `module.` prefix.
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = collections.OrderedDict((k[len('module.'):], v) for k, v in state_dict.items())
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f'checkpoint {str(path)!r} has no state dict of tensors (looked at keys "state_dict", '
            f'"model" and the top level, whose keys are {sorted(map(str, checkpoint))[:10]})')
    return collections.OrderedDict(state_dict)


def check_compatible(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     limit: int = 10) -> None:
    """Raise CheckpointError listing mismatched keys/shapes if ``state_dict`` is not ``model``'s.

    The message is :func:`acmix_mm.models.checkpoint.check_state_dict_fits`' (the backbones'
    ``Pretrained`` init uses the same).
    """
    check_state_dict_fits(model.state_dict(), state_dict, source, type(model).__name__, limit=limit)


def load_model_weights(model: torch.nn.Module, path: str,
                       checkpoint: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model`` strictly; returns the checkpoint.

    Args:
        model: the wrapped mmengine model (``MMLightningModule.model``).
        path: the file; read here unless ``checkpoint`` is given.
        checkpoint: the file's contents, already read by :func:`load_checkpoint_file` (callers
            read early, to fail before building anything).

    Raises:
        FileNotFoundError, CheckpointError: see :func:`load_checkpoint_file`; a checkpoint of
            another architecture raises CheckpointError listing the mismatched keys and shapes,
            and nothing is loaded.
    """
    if checkpoint is None:
        checkpoint = load_checkpoint_file(path)
    state_dict = model_state_dict(checkpoint, path)
    check_compatible(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return dict(checkpoint)


# What Lightning's fit(ckpt_path=...) restores besides the weights: without these keys it
# either fails late (KeyError "Trying to restore optimizer state but checkpoint contains only the
# model") or silently restarts the loops.
RESUME_KEYS = ('state_dict', 'optimizer_states', 'loops', 'epoch', 'global_step')


def _lightning_refusals(path: str) -> List[str]:
    """Globals Lightning's own ``torch.load(weights_only=True)`` of ``path`` would refuse.

    ``safe_load`` accepts numpy data and yacs configs; Lightning's loader does not, so a file
    holding them would pass our checks and then fail inside ``fit`` with torch's message.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 -- legacy (non-zip) files: safe_load already read them
        return []
    return [display_global(n) for n in sorted(names)]


class StartCheckpoint:
    """The checkpoints a training run starts from, checked before anything is built.

    ``train()`` reads them with :meth:`read` right after resolving ``--resume`` (an unreadable,
    unsafe or weights-only file fails before the model, the Trainer or the work dir exist), and
    calls :meth:`apply` once the model is built and initialised (``init_cfg``), before ``fit``:

    * ``--resume PATH``: the file must be a training checkpoint of ``tools/train.py`` (weights,
      optimizer and loop state; plain data that Lightning's ``weights_only=True`` loader reads),
      and its weights must fit the model (missing/unexpected keys and shapes are listed).
      Lightning then restores it in ``fit``.
    * ``load_from=PATH`` in the config (mmengine's key; ignored when resuming, as in mmengine's
      Runner): the whole model's weights, loaded strictly into the model after ``init_weights``.
      Unlike mmengine's non-strict ``load_from``, a file that does not fit the model exactly is
      an error naming the keys: to start from part of a model (e.g. another head), load the
      backbone with ``model.backbone.init_cfg=dict(type='Pretrained', checkpoint=PATH)``.

    Args:
        resume: the resolved ``--resume`` path, or None.
        load_from: ``cfg.load_from``, or None.
    """

    def __init__(self, resume: Optional[str] = None, load_from: Optional[str] = None):
        self.resume = resume
        self.load_from = None if resume else load_from
        self.ignored_load_from = load_from if resume else None
        self._state_dict: Optional[Mapping[str, torch.Tensor]] = None

    @classmethod
    def read(cls, resume: Optional[str], load_from: Any = None) -> 'StartCheckpoint':
        """Read and check the files (see the class docstring); returns what :meth:`apply` needs.

        Raises:
            FileNotFoundError, CheckpointError, TypeError: a missing, unreadable, unsafe or
                weights-only ``--resume`` file, or a bad ``load_from`` value; each message names
                the file (or value) and what is wrong.
        """
        if load_from is not None and not isinstance(load_from, (str, os.PathLike)):
            raise TypeError(f'load_from={load_from!r} is a {type(load_from).__name__}; expected the path '
                            'of a checkpoint file (or None)')
        load_from = os.fspath(load_from) if load_from else None
        start = cls(resume, load_from)
        if resume is not None:
            start._state_dict = start._read_resume(resume)
        elif load_from is not None:
            if not os.path.isfile(load_from):
                raise FileNotFoundError(f'load_from: checkpoint file {load_from!r} does not exist'
                                        ' (only local files are supported)')
            start._state_dict = model_state_dict(load_checkpoint_file(load_from), load_from)
        return start

    @staticmethod
    def _read_resume(path: str) -> Mapping[str, torch.Tensor]:
        checkpoint = load_checkpoint_file(path)
        missing = [k for k in RESUME_KEYS if k not in checkpoint]
        if missing:
            raise CheckpointError(
                f'--resume: checkpoint {path!r} is not a training checkpoint of tools/train.py: it has '
                f'no {", ".join(missing)} (its keys: {sorted(map(str, checkpoint))[:10]}). A weights-only '
                'file (an mmdet/mmseg/mmengine model, or a Lightning save_weights_only checkpoint) cannot '
                'resume a run; to start a new run from its weights, set load_from=PATH in the config '
                '(the whole model) or model.backbone.init_cfg=dict(type="Pretrained", checkpoint=PATH) '
                '(the backbone), without --resume')
        refused = _lightning_refusals(path)
        if refused:
            raise CheckpointError(
                f'--resume: checkpoint {path!r} holds {", ".join(refused)}, which Lightning\'s '
                'weights_only loader refuses; tools/train.py writes plain data only, so this file was '
                'not written by it. Start a new run from its weights with load_from=PATH instead')
        return model_state_dict(checkpoint, path)

    def apply(self, model: torch.nn.Module) -> None:
        """Check (``--resume``) or load (``load_from``) the weights into the built ``model``.

        Raises:
            CheckpointError: the file's weights do not fit ``model`` (keys and shapes listed);
                nothing is loaded.
        """
        if self.ignored_load_from:
            log.info('load_from=%r is ignored: resuming from %r', self.ignored_load_from, self.resume)
        if self._state_dict is None:
            return
        what, path = ('--resume', self.resume) if self.resume is not None else ('load_from', self.load_from)
        try:
            check_compatible(model, self._state_dict, path)
        except CheckpointError as err:
            raise CheckpointError(f'{what}: {err}') from None
        if self.resume is None:
            model.load_state_dict(self._state_dict, strict=True)
            log.info('load_from: loaded %d tensors from %r', len(self._state_dict), self.load_from)
        self._state_dict = None  # Lightning reads the resumed file again; do not hold two copies
