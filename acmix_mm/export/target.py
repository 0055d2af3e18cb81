"""What to export: the config's backbone or whole model, wrapped with flat named outputs."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import check_model_fits, load_checkpoint_dict, model_state_dict
from ..tool_models import build_tool_model, default_input_shape
from .common import PARTS, ExportError, check_shape

__all__ = ['flatten_outputs', 'FlatOutputs', 'check_exportable_model', 'ExportTarget', 'build_export_target']


def flatten_outputs(out: Any, name: str = 'out') -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a nested tuple/list/dict of tensors, depth first.

    Names join the path with dots, e.g. RetinaNet's ``([cls_0, ...], [bbox_0, ...])`` under
    names ``('cls_score', 'bbox_pred')`` gives ``cls_score.0, ..., bbox_pred.0, ...``.
    """
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        raise ExportError(f'cannot export an output of type {type(out).__name__} at {name!r}: '
                          'only tensors and tuples/lists/dicts of tensors are exportable')
    pairs = []
    for key, value in items:
        pairs.extend(flatten_outputs(value, f'{name}.{key}'))
    return pairs


class FlatOutputs(nn.Module):
    """A one-input module returning a flat tuple of tensors, as the ONNX exporter expects.

    Args:
        module: the backbone, or the whole model (called as ``module(x, data_samples,
            mode='tensor')`` when ``data_samples`` is not None).
        data_samples: the mmdet/mmseg data samples of the tensor-mode call, else None.
        names: one name per top-level output (e.g. ``('cls_score', 'bbox_pred')``); None:
            ``feat0, feat1, ...`` for a tuple, ``out`` for a single tensor.
    """

    def __init__(self, module: nn.Module, data_samples: Optional[list] = None,
                 names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.module = module
        self.data_samples = data_samples
        self.names = tuple(names) if names is not None else None

    def _call(self, x: torch.Tensor) -> Any:
        if self.data_samples is None:
            return self.module(x)
        return self.module(x, self.data_samples, mode='tensor')

    def named_outputs(self, out: Any) -> List[Tuple[str, torch.Tensor]]:
        """Flatten ``out`` (what the wrapped module returns) into named tensors."""
        if isinstance(out, torch.Tensor):
            return [(self.names[0] if self.names else 'out', out)]
        if not isinstance(out, (tuple, list)):
            raise ExportError(f'{type(self.module).__name__} returned a {type(out).__name__}; '
                              'expected a tensor or a tuple of tensors')
        if self.names is not None and len(self.names) != len(out):
            raise ExportError(f'{len(self.names)} output names {self.names} for '
                              f'{len(out)} outputs')
        pairs = []
        for i, item in enumerate(out):
            pairs.extend(flatten_outputs(item, self.names[i] if self.names else f'feat{i}'))
        return pairs

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, 3, H, W) preprocessed images -> the flat outputs (see :meth:`named_outputs`)."""
        return tuple(t for _, t in self.named_outputs(self._call(x)))


# --------------------------------------------------------------------------- model
def check_exportable_model(model: nn.Module) -> Tuple[str, ...]:
    """Names of the tensor-mode outputs of an exportable whole model, or an ExportError.

    Exportable: mmdet single-stage detectors (head outputs: the head's per-level lists,
    e.g. RetinaNet's ``cls_score`` and ``bbox_pred``) and mmseg encoder-decoders
    (``seg_logits``). Two-stage detectors (Mask R-CNN, Cascade) are refused: their tensor mode
    runs the RPN's proposal selection (score top-k, box filtering with Python branches on the
    data, mmcv's NMS) before RoIAlign, and a traced export freezes those data-dependent
    decisions at the example input, so the file would be silently wrong on other images; and
    in mmdet 3.3.0 the export fails anyway: under ONNX export ``DeltaXYWHBBoxCoder`` (the RPN's
    box decoding) imports ``mmdet.core.export``, a module mmdet 3 no longer has.
    """
    try:
        from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
    except ImportError:  # mmdet not installed: no detector can be passed here
        SingleStageDetector = TwoStageDetector = ()
    try:
        from mmseg.models.segmentors import EncoderDecoder
    except ImportError:
        EncoderDecoder = ()
    name = type(model).__name__
    if TwoStageDetector and isinstance(model, TwoStageDetector):
        raise ExportError(
            f'--part model cannot export the two-stage detector {name}: its tensor mode runs '
            'the RPN proposal selection (top-k, box filtering with Python branches on the data, '
            "mmcv's NMS) before RoIAlign, which a traced ONNX export freezes at the example "
            'input (a silently wrong graph); mmdet 3.3.0\'s box coder also fails under ONNX '
            'export (it imports mmdet.core.export, gone in mmdet 3). Export --part backbone, '
            'or use mmdeploy for the '
            'whole detector. Exportable models: mmdet single-stage detectors (e.g. RetinaNet) '
            'and mmseg encoder-decoders (e.g. Semantic FPN, UperNet).')
    if SingleStageDetector and isinstance(model, SingleStageDetector):
        if type(model.bbox_head).__name__ in ('RetinaHead', 'RetinaSepBNHead', 'SSDHead'):
            return ('cls_score', 'bbox_pred')
        return ()  # other heads: generic names out0.<level>, out1.<level>, ...
    if EncoderDecoder and isinstance(model, EncoderDecoder):
        return ('seg_logits',)
    raise ExportError(f'--part model supports mmdet single-stage detectors and mmseg '
                      f'encoder-decoders; {name} is neither (export --part backbone instead)')


@dataclasses.dataclass
class ExportTarget:
    """What to export: the module, its example input and the file's metadata.

    Attributes:
        module: a :class:`FlatOutputs` in eval mode (the model's own attention paths).
        inputs: (B, 3, H, W) float32 example input (seeded normal: preprocessed images).
        output_names: one per flat output.
        metadata: string key/values written into the ONNX file (``acmix_mm.*``).
        weights: a sentence saying where the weights came from (checkpoint or random init).
    """
    module: FlatOutputs
    inputs: torch.Tensor
    output_names: List[str]
    metadata: Dict[str, str]
    weights: str


def _dummy_data_samples(scope: str, batch: int, height: int, width: int) -> list:
    """Data samples for the tensor-mode call: only the image geometry, as an unpadded batch."""
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    return [Sample(metainfo=meta) for _ in range(batch)]


def _load_weights(model: nn.Module, part: str, checkpoint: str) -> str:
    """Load ``checkpoint`` (read with weights_only=True, strictly) into the model or backbone.

    A whole-model checkpoint (keys ``backbone.*``, Lightning or mmengine layout) loads into the
    whole model; for ``part='backbone'`` a backbone-only state dict loads into the backbone.
    """
    state_dict = model_state_dict(load_checkpoint_dict(checkpoint))
    target = model
    if part == 'backbone' and not any(k.startswith('backbone.') for k in state_dict):
        target = model.backbone
    check_model_fits(target, state_dict, checkpoint)
    target.load_state_dict(state_dict, strict=True)
    where = 'the backbone' if target is not model else 'the whole model'
    return f'weights from {checkpoint} ({len(state_dict)} tensors, into {where})'


def build_export_target(cfg: Any, part: str, checkpoint: Optional[str] = None,
                        shape: Optional[Sequence[int]] = None, batch: int = 1,
                        seed: int = 0, dynamic_batch: bool = False) -> ExportTarget:
    """Build the config's model (:func:`acmix_mm.tool_models.build_tool_model`: SyncBN reverted,
    seeded init), load weights, put it in eval mode and wrap the part to export.

    Args:
        cfg: an mmengine ``Config`` of an mmdet or mmseg model (``default_scope`` set).
        part: ``'backbone'`` or ``'model'`` (see the module docstring).
        checkpoint: a checkpoint file, read safely (weights_only); None: randomly initialised
            weights from ``torch.manual_seed(seed)`` (the modules' default init).
        shape: (H, W) in pixels; None: :func:`acmix_mm.tool_models.default_input_shape`.
        batch: the batch size B of the example input (and of the file, unless dynamic_batch).
        seed: seeds the random init (without ``checkpoint``) and the example input.
        dynamic_batch: record a dynamic batch dimension in the metadata (pass the same flag to
            :func:`export_onnx`).

    Raises:
        ExportError: bad part/shape/batch, an unsupported config scope or model type.
        FileNotFoundError, ValueError: a missing or unfitting checkpoint.
    """
    if part not in PARTS:
        raise ExportError(f'part must be one of {PARTS}, got {part!r}')
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f'batch must be a positive int, got {batch!r}')
    height, width = check_shape(shape if shape is not None else default_input_shape(cfg))
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint file {checkpoint!r} does not exist')
    try:
        built = build_tool_model(cfg, seed, what='export')
    except ValueError as err:
        raise ExportError(str(err)) from None
    model, scope, model_cfg = built.model, built.scope, built.model_cfg
    if checkpoint is not None:
        weights = _load_weights(model, part, checkpoint)
    else:
        weights = (f'no checkpoint: randomly initialised weights (torch.manual_seed({seed}), '
                   'the modules\' default init)')
    model.eval()

    if part == 'backbone':
        if not hasattr(model, 'backbone'):
            raise ExportError(f'{type(model).__name__} has no backbone to export')
        module = FlatOutputs(model.backbone)
    else:
        names = check_exportable_model(model)
        module = FlatOutputs(model, _dummy_data_samples(scope, batch, height, width),
                             names=names or None)
    module.eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, height, width, generator=generator)
    with torch.no_grad():
        output_names = [name for name, _ in module.named_outputs(module._call(inputs))]

    preprocessor = model_cfg.get('data_preprocessor') or {}
    metadata = {
        'acmix_mm.part': part,
        'acmix_mm.input_shape': json.dumps(['batch' if dynamic_batch else batch, 3, height,
                                            width]),
        'acmix_mm.input': 'preprocessed images: (x - mean) / std per channel, float32',
        'acmix_mm.mean': json.dumps(list(preprocessor.get('mean', []) or [])),
        'acmix_mm.std': json.dumps(list(preprocessor.get('std', []) or [])),
        'acmix_mm.bgr_to_rgb': json.dumps(bool(preprocessor.get('bgr_to_rgb', False))),
        'acmix_mm.model': type(model).__name__,
        'acmix_mm.backbone': type(getattr(model, 'backbone', model)).__name__,
        'acmix_mm.weights': weights,
    }
    return ExportTarget(module, inputs, output_names, metadata, weights)
