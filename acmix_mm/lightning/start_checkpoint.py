"""The checkpoints a training run starts from (``--resume``, ``load_from``), checked before anything is built.

Both are read with acmix_mm's safe reader (:mod:`acmix_mm.checkpoint.safe`): loading a
checkpoint never runs code from it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Mapping, Optional

import torch

from ..checkpoint import CheckpointError, check_model_fits, load_checkpoint_dict, model_state_dict
from ..checkpoint.safe import display_global
from .spec import LoopSpec

log = logging.getLogger(__name__)

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


def _check_loop_reaches(loop: LoopSpec, checkpoint: Mapping[str, Any], path: str) -> None:
    """Raise ``ValueError`` when the run's limit lies before the checkpoint's position.

    Lightning would restore the checkpoint and stop at once, or fail inside ``fit``. A limit equal
    to the checkpoint's position is allowed (a finished run has nothing left to do).
    """
    epoch, step = int(checkpoint['epoch']), int(checkpoint['global_step'])
    if loop.by_epoch and loop.max_epochs is not None and loop.max_epochs <= epoch:
        raise ValueError(f'--resume: checkpoint {path!r} is in epoch {epoch} (0-based, step {step}), '
                         f'past max_epochs={loop.max_epochs}: resume with max_epochs > {epoch} '
                         '(train_cfg.max_epochs or --max-epochs)')
    if not loop.by_epoch and loop.max_iters is not None and loop.max_iters < step:
        raise ValueError(f'--resume: checkpoint {path!r} is at step {step}, past max_iters={loop.max_iters}: '
                         f'resume with max_iters >= {step} (train_cfg.max_iters or --max-steps)')


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
    def read(cls, resume: Optional[str], load_from: Any = None,
             loop: Optional[LoopSpec] = None) -> 'StartCheckpoint':
        """Read and check the files (see the class docstring); returns what :meth:`apply` needs.

        Raises:
            FileNotFoundError, CheckpointError, TypeError: a missing, unreadable, unsafe or
                weights-only ``--resume`` file, or a bad ``load_from`` value; each message names
                the file (or value) and what is wrong.
            ValueError: ``loop`` (the run's limits) ends before the ``--resume`` checkpoint.
        """
        if load_from is not None and not isinstance(load_from, (str, os.PathLike)):
            raise TypeError(f'load_from={load_from!r} is a {type(load_from).__name__}; expected the path '
                            'of a checkpoint file (or None)')
        load_from = os.fspath(load_from) if load_from else None
        start = cls(resume, load_from)
        if resume is not None:
            start._state_dict = start._read_resume(resume, loop)
        elif load_from is not None:
            if not os.path.isfile(load_from):
                raise FileNotFoundError(f'load_from: checkpoint file {load_from!r} does not exist'
                                        ' (only local files are supported)')
            start._state_dict = model_state_dict(load_checkpoint_dict(load_from), load_from)
        return start

    @staticmethod
    def _read_resume(path: str, loop: Optional[LoopSpec]) -> Mapping[str, torch.Tensor]:
        checkpoint = load_checkpoint_dict(path)
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
        if loop is not None:
            _check_loop_reaches(loop, checkpoint, path)
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
            check_model_fits(model, self._state_dict, path)
        except CheckpointError as err:
            raise CheckpointError(f'{what}: {err}') from None
        if self.resume is None:
            model.load_state_dict(self._state_dict, strict=True)
            log.info('load_from: loaded %d tensors from %r', len(self._state_dict), self.load_from)
        self._state_dict = None  # Lightning reads the resumed file again; do not hold two copies
