"""Lightning wrappers for any mmengine model/dataset config (mmdet, mmseg, ...).

Public API:

* :class:`RunSpec` -- the config parsed and checked once (loop, optimiser settings, the
  ``lightning`` section, work dir, seed, precision).
* :class:`MMLightningModule` -- the model (``cfg.model``), its optimiser (``optim_wrapper``)
  and schedules (``param_scheduler``), training/validation/test steps.
* :class:`MMDataModule` -- ``{train,val,test}_dataloader`` and ``{val,test}_evaluator``.
* :func:`build_trainer` -- a Trainer from a :class:`RunSpec`.
* :func:`train`, :func:`test` -- what ``tools/train.py`` / ``tools/test.py`` run.
* :class:`RunPreempted` -- what ``train`` raises after a SIGTERM stop (exit code 143).
"""
from .api import test, train
from .config import load_config, to_plain
from ..datasets.paths import check_dataset_paths
from .data import MMDataModule
from .module import MMLightningModule, NonFiniteLossError, NonFiniteWeightsError
from .preemption import PREEMPTED_EXIT_CODE, RunPreempted
from .spec import LoopSpec, RunSpec, TrainerOverrides
from .trainer import build_trainer

__all__ = ['MMLightningModule', 'MMDataModule', 'NonFiniteLossError', 'NonFiniteWeightsError', 'LoopSpec',
           'RunSpec', 'RunPreempted', 'PREEMPTED_EXIT_CODE', 'TrainerOverrides', 'build_trainer',
           'check_dataset_paths', 'load_config', 'to_plain', 'train', 'test']
