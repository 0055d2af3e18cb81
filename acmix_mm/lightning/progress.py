"""The progress bar of iteration-based runs.

Lightning's ``RichProgressBar`` titles the training bar ``Epoch {e}/{max_epochs - 1}``. An
``IterBasedTrainLoop`` maps to ``max_epochs=-1``, which it shows as ``Epoch 1/-2``; this bar
shows the step against ``max_steps`` instead (``Step 120/1000``).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class IterationProgressBar(RichProgressBar):
    """``RichProgressBar`` titled ``Step {global_step}/{max_steps}`` when the run has no epoch limit."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f'Step {trainer.global_step}/{trainer.max_steps}'
        return f'{text:{len(self.validation_description)}}'

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.train_progress_bar_id is not None and self.progress is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
