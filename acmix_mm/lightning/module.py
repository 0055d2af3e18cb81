"""MMLightningModule: any mmengine ``BaseModel`` built from a config, trained by Lightning.

The module is a thin adapter: the wrapped model keeps its own ``data_preprocessor``, its
``loss`` mode and ``parse_losses`` for training and its ``val_step``/``test_step`` for
evaluation; the optimiser and schedules are mmengine's own (:mod:`.optim`); evaluation uses
the mmengine ``Evaluator`` that :class:`~acmix_mm.lightning.MMDataModule` builds. Nothing
here knows about a task: detection, segmentation or anything else lives in the config.

Training step, per batch (the same sequence as mmengine's ``BaseModel.train_step``)::

    data = model.data_preprocessor(batch, training=True)
    losses = model(**data, mode='loss')          # dict of loss terms
    loss, log_vars = model.parse_losses(losses)  # total + scalars to log
    -> Lightning: backward, clipping (optim_wrapper.clip_grad), optimiser step
    -> iteration-based schedules step (mmengine's ParamSchedulerHook.after_train_iter)
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

import torch
from lightning.pytorch import Callback, LightningModule
from mmengine.config import Config
from mmengine.model import BaseDataPreprocessor, BaseModel, revert_sync_batchnorm
from mmengine.registry import init_default_scope

from ..registry import build_model
from ..checkpoint import layouts
from ..checkpoint.fit import check_model_fits
from .config import ConfigLike, as_config, to_plain
from .spec import LoopSpec, OptimSettings, RunSpec
from .preemption import StopOnSigterm, resume_command
from .resumable import collect_rng_states, restore_rng_states
from .optim import SchedulerStepper, build_optimizer, build_param_schedulers, clip_gradients

log = logging.getLogger(__name__)

SCHEDULER_STATE_KEY = 'mm_param_schedulers'
RNG_STATE_KEY = 'rng_states'
LOADER_STATE_KEY = 'train_loader_state'


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (``lightning.nan_policy='raise'``)."""


class NonFiniteWeightsError(NonFiniteLossError):
    """An optimiser step left NaN/Inf in the weights although the loss was finite.

    A subclass of :class:`NonFiniteLossError` so that one ``except`` catches both stops.
    """


class MMLightningModule(LightningModule):
    """Wrap the mmengine model of ``cfg.model`` for Lightning.

    Args:
        cfg: an mmengine config (object, dict or path) with ``model``; training also needs
            ``optim_wrapper`` and ``train_cfg`` (``param_scheduler`` optional).
        spec: the parsed run (:class:`~acmix_mm.lightning.spec.RunSpec`); None parses ``cfg``
            (:meth:`RunSpec.default_for`).
        init_weights: call the model's ``init_weights()`` after building it, as mmengine's Runner
            does before training (``init_cfg``, e.g. pretrained backbones). Off for evaluation,
            where a checkpoint provides the weights.

    From the spec's ``lightning`` section: ``nan_policy`` ('raise' | 'skip'): what a NaN/Inf
    training loss does; ``sync_bn`` ('auto' | 'keep' | 'revert'): 'auto' turns SyncBN into BN
    when training on one process or on CPU, where torch's SyncBatchNorm cannot synchronise.

    Attributes:
        model: the wrapped ``BaseModel``.
        metrics: ``{'val'|'test': {name: float}}``, the last evaluation's metrics.
    """

    def __init__(self, cfg: ConfigLike, spec: Optional[RunSpec] = None, init_weights: bool = True):
        super().__init__()
        self.cfg: Config = as_config(cfg)
        self.spec: RunSpec = spec if spec is not None else RunSpec.default_for(self.cfg)
        # Plain data only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters({'cfg': to_plain(self.cfg.to_dict()), 'init_weights': init_weights})
        scope = self.cfg.get('default_scope')
        if scope:
            init_default_scope(scope)
        if not self.cfg.get('model'):
            raise ValueError('the config has no model')
        self.model = build_model(self.cfg.model)
        if not isinstance(self.model, BaseModel):
            raise TypeError(f'cfg.model builds a {type(self.model).__name__}; MMLightningModule wraps '
                            'mmengine BaseModel subclasses (with data_preprocessor and loss/predict modes)')
        if init_weights and hasattr(self.model, 'init_weights'):
            self.model.init_weights()
        self.stepper: Optional[SchedulerStepper] = None
        self._pending_scheduler_states = None
        self._pending_rng_states: Optional[Mapping[str, Any]] = None
        self._pending_loader_state: Optional[Mapping[str, Any]] = None
        self.metrics: Dict[str, Dict[str, Any]] = {}
        self.evaluators: Dict[str, Any] = {}  # set directly when no MMDataModule is used

    @property
    def nan_policy(self) -> str:
        return self.spec.lightning.nan_policy

    @property
    def sync_bn(self) -> str:
        return self.spec.lightning.sync_bn

    @property
    def optim_settings(self) -> OptimSettings:
        return self.spec.optim

    # -- device ---------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # mmengine's data preprocessors cache their device and only update it in their own .to();
        # Lightning moves the LightningModule, whose children see only _apply. Follow the move.
        result = super()._apply(fn, *args, **kwargs)
        device = next((t.device for t in self.model.parameters()), None)
        if device is not None:
            for module in self.model.modules():
                if isinstance(module, BaseDataPreprocessor):
                    module._device = device
        return result

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.sync_bn == 'revert' or (self.sync_bn == 'auto' and self._sync_bn_unusable()):
            reverted = revert_sync_batchnorm(self.model)
            if reverted is not self.model:  # only when the model itself is a SyncBN layer
                self.model = reverted

    def _sync_bn_unusable(self) -> bool:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return True
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return True
        # torch's SyncBatchNorm synchronises only CUDA-like tensors; on CPU it raises.
        return trainer.strategy.root_device.type == 'cpu'

    def on_train_start(self) -> None:
        # Resume: put back what the checkpoint recorded at the moment it was written. Here, after
        # Lightning has built the training iterator (lazily: no batch and no random draw yet) and
        # before the first batch, so that the run continues exactly as an uninterrupted one.
        if self._pending_loader_state is not None:
            loader = self.trainer.train_dataloader
            if hasattr(loader, 'load_state_dict'):
                loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        if self._pending_rng_states is not None:
            states, self._pending_rng_states = self._pending_rng_states, None
            try:
                restore_rng_states(self._own_rng_states(states))
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
                raise ValueError(f'the resumed checkpoint\'s {RNG_STATE_KEY!r} entry is not the random '
                                 f'states acmix_mm writes ({type(error).__name__}: {error})') from error

    def loop_spec(self) -> LoopSpec:
        """The training loop of the spec (a ``ValueError`` for a spec without one)."""
        if self.spec.loop is None:
            raise ValueError('the config has no train_cfg; training needs e.g. '
                             "train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)")
        return self.spec.loop

    def configure_optimizers(self):
        if not self.cfg.get('optim_wrapper'):
            raise ValueError('the config has no optim_wrapper; training needs one, e.g. '
                             "optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9))")
        optim_wrapper = build_optimizer(self.model, self.cfg.optim_wrapper)
        epoch_length = self._epoch_length()
        # On the torch optimiser, whose step() Lightning calls (mmengine's schedulers count those
        # calls to warn about a wrong order); they change the same param_groups as on the wrapper.
        schedulers = build_param_schedulers(self.cfg.get('param_scheduler'), optim_wrapper.optimizer,
                                            self.loop_spec(), epoch_length)
        self.stepper = SchedulerStepper(schedulers)
        if self._pending_scheduler_states is not None:
            self.stepper.load_state_dict(self._pending_scheduler_states)
            self._pending_scheduler_states = None
        return optim_wrapper.optimizer

    def _epoch_length(self) -> int:
        """Training batches per epoch (mmengine's ``len(train_dataloader)``)."""
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError('configure_optimizers needs the module attached to a Trainer')
        trainer.fit_loop.setup_data()
        length = trainer.num_training_batches
        if length == float('inf'):
            raise ValueError('the training dataloader has no length; param_scheduler needs one '
                             '(epoch_length for convert_to_iter_based and default ends)')
        return int(length)

    # -- training -------------------------------------------------------------------------------
    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        return self.model(inputs, data_samples, mode=mode)

    def _run_forward(self, data: Any, mode: str):
        if isinstance(data, Mapping):
            return self.model(**data, mode=mode)
        if isinstance(data, (list, tuple)):
            return self.model(*data, mode=mode)
        raise TypeError(f'the data preprocessor returned a {type(data).__name__}; expected a dict or tuple')

    def training_step(self, batch: Any, batch_idx: int):
        data = self.model.data_preprocessor(batch, True)
        losses = self._run_forward(data, mode='loss')
        loss, log_vars = self.model.parse_losses(losses)
        if not self._loss_is_finite(loss, log_vars, batch_idx):
            return None  # nan_policy='skip': Lightning skips backward and the optimiser step
        batch_size = _batch_size(data)
        values = {f'train/{k}': v.detach() if isinstance(v, torch.Tensor) else v for k, v in log_vars.items()}
        values['train/lr'] = self.trainer.optimizers[0].param_groups[0]['lr']
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size, logger=bool(self.trainer.loggers))
        self.log('loss', loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 batch_size=batch_size)
        return loss

    def _loss_is_finite(self, loss: torch.Tensor, log_vars: Mapping[str, Any], batch_idx: int) -> bool:
        bad_here = not bool(torch.isfinite(loss.detach()).all())
        bad_anywhere = bad_here
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must take the same branch, or DDP's gradient all-reduce hangs.
            bad_anywhere = self.trainer.strategy.reduce_boolean_decision(bad_here, all=False)
        if not bad_anywhere:
            return True
        terms = ', '.join(f'{k}={float(v):.6g}' for k, v in log_vars.items())
        where = (f'training step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})'
                 if self._trainer is not None else f'batch {batch_idx}')
        detail = terms if bad_here else 'on another rank'
        message = f'non-finite loss at {where}: {detail}'
        if self.nan_policy == 'skip':
            log.warning('%s; skipping this batch (lightning.nan_policy=skip)', message)
            return False
        raise NonFiniteLossError(message + " (set lightning=dict(nan_policy='skip') to skip such batches)")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # mmengine's clip_grad (any norm_type, or by value) rather than Lightning's 2-norm only.
        if self.optim_settings.clip_grad:
            grad_norm = clip_gradients(optimizer, self.optim_settings.clip_grad)
            if grad_norm is not None:
                self.log('train/grad_norm', grad_norm, on_step=True, on_epoch=False,
                         logger=bool(self.trainer.loggers))
        elif gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_callbacks(self):
        # Lightning runs callbacks' on_train_batch_end before the module's own, and the
        # ModelCheckpoint callback last of them: a step-interval checkpoint would otherwise be
        # written before this batch's schedule step, and a resume would lag the schedule by one.
        # The SIGTERM stop writes a checkpoint too, so it comes after the schedule step as well.
        spec = self.spec
        return [_AfterTrainIter(),
                StopOnSigterm(spec.checkpoint_dir, resume_command(getattr(self.cfg, 'filename', None), spec.work_dir))]

    def after_train_iter(self, batch_idx: int) -> None:
        """mmengine's ``after_train_iter``: step the schedules, stop after ``max_iters`` batches.

        Called by :class:`_AfterTrainIter` after every training batch, before any checkpoint of
        that batch is written.
        """
        self._check_finite_weights(batch_idx)
        if self.stepper is None:
            return
        self.stepper.after_train_iter()
        # Epoch-based schedules step when the epoch's training part ends, before the end-of-epoch
        # validation and checkpoint, so that a checkpoint holds the stepped schedule (as in mmengine).
        loop = self.spec.loop
        if loop.by_epoch and batch_idx + 1 == self.trainer.num_training_batches:
            self.stepper.after_train_epoch()
        if not loop.by_epoch:
            # mmengine's IterBasedTrainLoop counts batches. Under gradient accumulation Lightning
            # also steps at every epoch end, so max_steps cannot say when max_iters batches are
            # done; stop on the batch count (restored on resume with the loop's progress).
            done = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
            if done >= loop.max_iters:
                self.trainer.should_stop = True

    def _check_finite_weights(self, batch_idx: int) -> None:
        """Stop when the step just taken left NaN/Inf in a weight, whatever ``nan_policy`` says.

        The loss check sees a bad update (an overflowing learning rate, a NaN gradient from a
        finite loss) only at the next step: after the epoch-end validation and checkpoint,
        which would save the broken weights into last.ckpt. One total norm per step (a
        reduction over all parameters); names are looked up only when it is not finite.
        """
        params = [p.detach() for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        total = torch.nn.utils.get_total_norm(params)
        if bool(torch.isfinite(total)):
            return
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return  # finite weights whose norm overflows float32: not this check's business
        names = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise NonFiniteWeightsError(
            f'non-finite weights after training step {self.global_step - 1} (epoch {self.current_epoch}, '
            f'batch {batch_idx}): {names}; the loss was finite, the update was not (learning rate too '
            'large? lightning.nan_policy cannot skip a step already taken)')

    # -- evaluation -----------------------------------------------------------------------------
    def evaluator(self, split: str):
        if split in self.evaluators:
            return self.evaluators[split]
        datamodule = getattr(self._trainer, 'datamodule', None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, 'evaluator'):
            return datamodule.evaluator(split)
        raise ValueError(f'no {split} evaluator: use MMDataModule or set module.evaluators[{split!r}]')

    def validation_step(self, batch: Any, batch_idx: int):
        outputs = self.model.val_step(batch)
        self.evaluator('val').process(data_samples=outputs, data_batch=batch)
        return outputs

    def test_step(self, batch: Any, batch_idx: int):
        outputs = self.model.test_step(batch)
        self.evaluator('test').process(data_samples=outputs, data_batch=batch)
        return outputs

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            # A sanity check sees a few batches only: drop them rather than score a partial set.
            for metric in self.evaluator('val').metrics:
                metric.results.clear()
            return
        self._evaluate('val', self.trainer.val_dataloaders)

    def on_test_epoch_end(self) -> None:
        self._evaluate('test', self.trainer.test_dataloaders)

    def _evaluate(self, split: str, dataloader) -> None:
        if isinstance(dataloader, (list, tuple)):
            if len(dataloader) != 1:
                raise ValueError(f'MMLightningModule evaluates one {split} dataloader, got {len(dataloader)}')
            dataloader = dataloader[0]
        # Every rank holds its unpadded shard; evaluate() gathers them in order, truncates to the
        # dataset size, computes on rank 0 and broadcasts (see data.py).
        metrics = to_plain(self.evaluator(split).evaluate(len(dataloader.dataset)))
        self.metrics[split] = metrics
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            # Identical on every rank already: sync_dist only averages equal numbers.
            self.log_dict(scalars, sync_dist=True, prog_bar=False, logger=bool(self.trainer.loggers))

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state_dict = layouts.strip_model_prefix(checkpoint['state_dict'])
        if self.stepper is not None:
            checkpoint[SCHEDULER_STATE_KEY] = self.stepper.state_dict()
        # Lightning saves neither the global random states nor (for a loader it cannot see as
        # stateful before its own restore runs) the data position: both are needed for a resume
        # that equals an uninterrupted run. Every rank runs this hook (saving is collective) but
        # only rank 0 writes the file: gather every rank's states into it.
        checkpoint[RNG_STATE_KEY] = self._gather_rng_states()
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        if loader is not None and hasattr(loader, 'state_dict') and hasattr(loader, 'load_state_dict'):
            checkpoint[LOADER_STATE_KEY] = loader.state_dict()
        meta = {'epoch': self.current_epoch, 'iter': self.global_step, 'cfg': self.cfg.pretty_text}
        datamodule = getattr(self._trainer, 'datamodule', None)
        if datamodule is not None and hasattr(datamodule, 'dataset_meta'):
            dataset_meta = datamodule.dataset_meta()
            if dataset_meta is not None:
                meta['dataset_meta'] = dataset_meta
        elif getattr(self.model, 'dataset_meta', None):
            meta['dataset_meta'] = self.model.dataset_meta
        checkpoint['meta'] = meta
        plain = to_plain({k: v for k, v in checkpoint.items() if k != 'state_dict'})
        checkpoint.clear()
        checkpoint.update(plain)
        checkpoint['state_dict'] = state_dict
        checkpoint[layouts.STATE_DICT_LAYOUT_KEY] = layouts.STATE_DICT_LAYOUT

    def _gather_rng_states(self) -> Dict[str, Any]:
        """This rank's states, plus ``'per_rank'`` (every rank's, in rank order) under DDP."""
        states = collect_rng_states()
        trainer = self._trainer
        if (trainer is not None and trainer.world_size > 1 and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            gathered: List[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            states = dict(states, per_rank=gathered)
        return states

    def _own_rng_states(self, states: Mapping[str, Any]) -> Mapping[str, Any]:
        """The states this rank saved (rank 0's when the world size changed)."""
        per_rank = states.get('per_rank')
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if per_rank and len(per_rank) == world:
            return per_rank[rank]
        return states

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if checkpoint.get(layouts.STATE_DICT_LAYOUT_KEY) == layouts.STATE_DICT_LAYOUT:
            # Lightning loads state_dict into this module right after this hook.
            state_dict = checkpoint['state_dict']
            if not any(k.startswith(layouts.MODEL_PREFIX) for k in state_dict):
                check_model_fits(self.model, state_dict, 'the resumed checkpoint')
                checkpoint['state_dict'] = layouts.add_model_prefix(state_dict)
        self._pending_scheduler_states = checkpoint.get(SCHEDULER_STATE_KEY)
        self._pending_rng_states = checkpoint.get(RNG_STATE_KEY)
        self._pending_loader_state = checkpoint.get(LOADER_STATE_KEY)


class _AfterTrainIter(Callback):
    """Runs :meth:`MMLightningModule.after_train_iter` (see ``configure_callbacks``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.after_train_iter(batch_idx)


def _batch_size(data: Any) -> int:
    samples = data.get('data_samples') if isinstance(data, Mapping) else None
    if samples is not None:
        return len(samples)
    inputs = data.get('inputs') if isinstance(data, Mapping) else None
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    return 1
