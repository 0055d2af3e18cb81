"""Lightning wrappers for any mmengine model/dataset config (mmdet, mmseg, ...).

Public API:

* :class:`MMLightningModule` -- the model (``cfg.model``), its optimiser (``optim_wrapper``)
  and schedules (``param_scheduler``), training/validation/test steps.
* :class:`MMDataModule` -- ``{train,val,test}_dataloader`` and ``{val,test}_evaluator``.
* :func:`build_trainer` -- a Trainer from ``train_cfg`` + the ``lightning`` section + CLI.
* :func:`train`, :func:`test` -- what ``tools/train.py`` / ``tools/test.py`` run.
"""
from .api import test, train
from .config import LoopSpec, load_config, to_plain
from .data import MMDataModule, check_dataset_paths
from .module import MMLightningModule, NonFiniteLossError, NonFiniteWeightsError
from .trainer import TrainerOverrides, build_trainer

__all__ = ['MMLightningModule', 'MMDataModule', 'NonFiniteLossError', 'NonFiniteWeightsError', 'LoopSpec',
           'TrainerOverrides', 'build_trainer', 'check_dataset_paths', 'load_config', 'to_plain', 'train', 'test']
