"""A test-only mmdet detector whose training loss turns non-finite at a chosen step.

``NonFiniteAtStepMaskRCNN`` is mmdet's own ``MaskRCNN`` (same modules, same state_dict keys, so
its checkpoints load into a stock Mask R-CNN config) with one change: in the ``loss`` call with
index ``nonfinite_step`` (0-based, counted per instance) ``inf`` or ``nan`` is added to the RPN
classification loss, as a real divergence would make it. (Added, not multiplied: an FPN level
whose loss is exactly 0 would turn ``0 * inf`` into ``nan``.) Every other call returns
mmdet's losses untouched. It is registered in mmdet's ``MODELS`` on import.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from mmdet.models.detectors import MaskRCNN
from mmdet.registry import MODELS

NONFINITE_VALUES = {'inf': float('inf'), 'nan': float('nan')}
BAD_TERM = 'loss_rpn_cls'


@MODELS.register_module(force=True)
class NonFiniteAtStepMaskRCNN(MaskRCNN):
    """``MaskRCNN`` whose ``loss_rpn_cls`` becomes ``nonfinite_value`` at one training step.

    Args:
        nonfinite_step: 0-based index of the ``loss`` call (= training step without gradient
            accumulation) that turns non-finite.
        nonfinite_value: ``'inf'`` or ``'nan'``.
        **kwargs: ``MaskRCNN``'s arguments.
    """

    def __init__(self, *, nonfinite_step: int, nonfinite_value: str = 'nan', **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(nonfinite_step, int) or nonfinite_step < 0:
            raise ValueError(f'nonfinite_step must be an int >= 0, got {nonfinite_step!r}')
        if nonfinite_value not in NONFINITE_VALUES:
            raise ValueError(f'nonfinite_value={nonfinite_value!r}; allowed: {", ".join(NONFINITE_VALUES)}')
        self.nonfinite_step = nonfinite_step
        self.nonfinite_value = nonfinite_value
        self.loss_calls = 0

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples: Any) -> Dict[str, Any]:
        losses = super().loss(batch_inputs, batch_data_samples)
        if self.loss_calls == self.nonfinite_step:
            # mmdet returns loss_rpn_cls as a list (one tensor per FPN level); poison every level.
            bad = NONFINITE_VALUES[self.nonfinite_value]
            term = losses[BAD_TERM]
            losses[BAD_TERM] = [t + bad for t in term] if isinstance(term, list) else term + bad
        self.loss_calls += 1
        return losses
