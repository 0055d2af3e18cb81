"""ONNX export of ACMix backbones and models, with an onnxruntime parity check.

What ``tools/export_onnx.py`` runs (reference: ``docs/export.md``; costs: ``docs/benchmarks.md``).
This package imports the operator, the models and the checkpoint layer, never Lightning.

Two parts of a config's model export (:mod:`.target`):

- ``'backbone'``: ``model.backbone(x)``; outputs: the ``out_indices`` feature maps
  ``feat0, feat1, ...`` (B, C_i, H_i, W_i).
- ``'model'``: the tensor-mode forward ``model(x, data_samples, mode='tensor')``: backbone,
  neck and head without post-processing (no NMS, no resizing). Supported for mmdet's
  single-stage detectors (e.g. RetinaNet: ``cls_score.<level>`` (B, A*K, H_l, W_l) and
  ``bbox_pred.<level>`` (B, A*4, H_l, W_l)) and mmseg's encoder-decoders (``seg_logits``
  (B, K, H/4, W/4) for Semantic FPN / UperNet). Two-stage detectors are refused, see
  :func:`check_exportable_model`.

The input ``x`` is the *preprocessed* image batch (B, 3, H, W), float32: mean/std normalised
(and BGR->RGB swapped) as the config's ``data_preprocessor`` does; the exported file records
that normalisation in its metadata (``acmix_mm.mean``, ``acmix_mm.std``, ``acmix_mm.bgr_to_rgb``).

Exporters (``exporter=``, :mod:`.writer`): ``'torchscript'`` (default;
``torch.onnx.export(..., dynamo=False)``) traces the model; ``'dynamo'`` (torch.export +
onnxscript + the onnx optimiser) gives a smaller graph, takes much longer to export and needs
``onnxscript``.

ACMix's fast attention kernels ('cpp', a torch custom op; 'triton'; 'lean', a custom
``torch.autograd.Function``) have no ONNX translation. The reference 'unfold' path
(index_select, slicing, stack, softmax) exports with both exporters and computes the same
function (to float rounding), so every :class:`~acmix_mm.ops.ACMix` is switched to
``attn_impl='unfold'`` during the export (:func:`exportable_attention`) and back afterwards.

Fixed input size: the reflection-padding index tables, the attention's coordinate maps and, for
Swin, the window padding and shift masks are computed from the map's size in Python, so the
tracer records them as constants. The exported model accepts exactly the H x W it was exported
at, and the batch size B too unless exported with ``dynamic_batch=True`` (TorchScript exporter);
export once per input size (mmdet pads images to a multiple of 32, e.g. 800 x 1344 for
800 x 1333 inputs).
"""
from .common import (DEFAULT_OPSET, EXPORTERS, OPSET_RANGE, PARTS, TOLERANCE, ExportError, check_exporter,
                     check_opset, check_shape)
from .parity import ParityReport, compare_outputs, run_onnxruntime
from .target import ExportTarget, FlatOutputs, build_export_target, check_exportable_model, flatten_outputs
from .writer import export_onnx, exportable_attention

__all__ = [
    'PARTS', 'EXPORTERS', 'DEFAULT_OPSET', 'OPSET_RANGE', 'TOLERANCE', 'ExportError', 'ParityReport',
    'exportable_attention', 'flatten_outputs', 'FlatOutputs', 'check_exportable_model', 'build_export_target',
    'ExportTarget', 'export_onnx', 'run_onnxruntime', 'compare_outputs', 'check_shape', 'check_exporter',
    'check_opset',
]
