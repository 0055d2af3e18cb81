"""ONNX export of ACMix backbones and models, with an onnxruntime parity check.

What ``tools/export_onnx.py`` runs. Two parts of a config's model export:

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

Exporters (``exporter=``): torch 2.13 has two, and both export our graphs.

- ``'torchscript'`` (default; ``torch.onnx.export(..., dynamo=False)``, marked legacy in
  torch 2.13): traces the model. ``tools/export_onnx.py --part backbone --check`` on the demo
  backbone (5 ACMix layers, 96 x 128) takes 12.5 s of CPU; the graph is large (6,409 nodes)
  because every window offset is a slice.
- ``'dynamo'`` (``dynamo=True``: torch.export + onnxscript + onnx optimiser): a smaller graph
  (1,339 nodes for the same backbone, faster on onnxruntime), but the same run takes 146 s of
  CPU (over 10x), mostly in the onnx optimiser; it needs ``onnxscript``.

ACMix's fast attention kernels ('cpp', a torch custom op; 'triton'; 'lean', a custom
``torch.autograd.Function`` with an in-place offset loop) have no ONNX translation: the
TorchScript exporter fails on 'lean' ("Argument passed to at() was not in the map"); the
dynamo exporter traces its forward op by op, correctly, but into a 3.4x larger graph (4,538
nodes for the demo backbone) after a quarter of an hour. The reference 'unfold' path
(index_select, slicing, stack, softmax) exports with both and computes the same function (to
float rounding), so every :class:`~acmix_mm.ops.ACMix` is switched to ``attn_impl='unfold'``
during the export (:func:`exportable_attention`) and switched back afterwards.
(``attn_impl='auto'`` also resolves to 'unfold' under export; the explicit switch covers
models built with an explicit impl.)

Fixed input size: the reflection-padding index tables, the attention's coordinate maps
(``linspace`` over the map) and, for Swin, the window padding and shift masks are computed
from the map's size in Python, so the tracer records them as constants for the example's
H x W. The exported model therefore accepts exactly the H x W it was exported at
(onnxruntime refuses other sizes with "Got invalid dimensions"), and the batch size B too
unless exported with ``dynamic_batch=True`` (TorchScript exporter; the batch dimension is read
from the input's shape, tested at other batch sizes); export once per input size
(mmdet pads images to a multiple of 32, so e.g. 800 x 1344 for 800 x 1333 inputs). With the
TorchScript exporter, ``dynamic_axes`` on H, W gives a file that fails at any other size (a
Reshape reads a baked-in size); with the dynamo exporter, whose fixed-size export already
takes minutes, an export with dynamic H, W was still running when stopped after 5 minutes.
Hence fixed-size files; shape-generic index computations (and a dynamic export) are future
work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint import atomic_write, check_model_fits, load_checkpoint_dict, model_state_dict
from .ops import ACMix
from .tool_models import build_tool_model, default_input_shape

__all__ = [
    'PARTS', 'EXPORTERS', 'DEFAULT_OPSET', 'OPSET_RANGE', 'TOLERANCE', 'ExportError',
    'ParityReport',
    'exportable_attention', 'flatten_outputs', 'FlatOutputs', 'check_exportable_model',
    'build_export_target', 'ExportTarget', 'export_onnx', 'run_onnxruntime', 'compare_outputs',
    'check_shape',
]

PARTS = ('backbone', 'model')
EXPORTERS = ('torchscript', 'dynamo')
# Opsets each exporter writes: torch 2.13's TorchScript exporter 7..20 (11 is the floor here:
# older Softmax/Gather semantics), its dynamo exporter 18..23 (onnxscript's functions).
OPSET_RANGE = {'torchscript': (11, 20), 'dynamo': (18, 23)}
DEFAULT_OPSET = {'torchscript': 17, 'dynamo': 18}
# --check fails above this difference (relative to max(1, the output's largest magnitude)).
TOLERANCE = 1e-4


class ExportError(ValueError):
    """A bad export request (part, shape, opset, model type) or a failed export / parity check."""


# --------------------------------------------------------------------------- attention path
@contextlib.contextmanager
def exportable_attention(model: nn.Module) -> Iterator[int]:
    """Switch every :class:`acmix_mm.ops.ACMix` in ``model`` to ``attn_impl='unfold'``.

    The fast paths ('cpp' custom op, 'triton', 'lean' autograd Function) do not export;
    'unfold' computes the same attention with index_select, slicing, stack and softmax, which
    export. Yields the number of ACMix modules switched; restores their settings on exit.
    """
    saved: List[Tuple[nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, ACMix):
            if not hasattr(module, 'attn_impl'):
                raise ExportError(f'{type(module).__name__} has no attn_impl attribute: cannot '
                                  "select the exportable 'unfold' attention path")
            saved.append((module, module.attn_impl))
            module.attn_impl = 'unfold'
    try:
        yield len(saved)
    finally:
        for module, impl in saved:
            module.attn_impl = impl


# --------------------------------------------------------------------------- outputs
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


def check_shape(shape: Sequence[Any]) -> Tuple[int, int]:
    """(H, W) as positive ints, or an ExportError naming the bad value."""
    if len(shape) != 2:
        raise ExportError(f'shape must be (H, W), got {tuple(shape)!r}')
    out = []
    for name, value in zip(('H', 'W'), shape):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f'shape {name} must be a positive int (pixels), got {value!r}')
        out.append(value)
    return out[0], out[1]


def check_exporter(exporter: Any) -> str:
    """``exporter`` if it is one of :data:`EXPORTERS`, else an ExportError."""
    if exporter not in EXPORTERS:
        raise ExportError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    return exporter


def check_opset(opset: Any, exporter: str = 'torchscript') -> int:
    """``opset`` if it is an int in ``OPSET_RANGE[exporter]``, else an ExportError."""
    low, high = OPSET_RANGE[check_exporter(exporter)]
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ExportError(f'opset must be an int in [{low}, {high}] for the {exporter} '
                          f'exporter, got {opset!r}')
    return opset


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


# --------------------------------------------------------------------------- export
def export_onnx(module: nn.Module, inputs: torch.Tensor, path: str,
                output_names: Sequence[str], opset: Optional[int] = None,
                metadata: Optional[Dict[str, str]] = None,
                verify: Optional[Any] = None, exporter: str = 'torchscript',
                dynamic_batch: bool = False) -> Tuple[int, int]:
    """Export ``module(inputs)`` to the ONNX file ``path``, written atomically.

    Every ACMix is switched to the exportable attention path for the export only. The file is
    written to a temporary name next to ``path``, given ``metadata``, checked with
    ``onnx.checker``, passed to ``verify(tmp_path)`` when given (e.g. an onnxruntime parity
    check that raises), and only then renamed onto ``path``: an interrupted or failed export
    leaves no file behind (nor a partial one at ``path``).

    Args:
        module: returns a flat tuple of tensors (:class:`FlatOutputs`).
        inputs: the example input (B, 3, H, W); the file accepts exactly this shape.
        path: the .onnx file to write (its folder is created).
        output_names: names of the graph outputs, one per tensor.
        opset: ONNX opset in ``OPSET_RANGE[exporter]``; None: ``DEFAULT_OPSET[exporter]``.
        metadata: string key/values for the model's ``metadata_props``.
        verify: called with the temporary file's path before it is renamed; raise to abort.
        exporter: ``'torchscript'`` (default: ~10x faster to export on our graphs) or
            ``'dynamo'`` (torch.export + onnxscript; a 4-5x smaller graph, minutes to export).
        dynamic_batch: make the batch dimension of the input and of every output dynamic
            (``'batch'``); H and W stay fixed. TorchScript exporter only: the images of a batch
            are independent and the traced graph reads B from the input's shape.

    Returns:
        (the number of ACMix modules exported through the 'unfold' path, the opset written).
    """
    import onnx

    check_exporter(exporter)
    opset = DEFAULT_OPSET[exporter] if opset is None else check_opset(opset, exporter)
    if dynamic_batch and exporter != 'torchscript':
        raise ExportError('dynamic_batch is supported with the torchscript exporter only, got '
                          f'exporter {exporter!r}')
    dynamic_axes = ({name: {0: 'batch'} for name in ['input', *output_names]}
                    if dynamic_batch else None)
    with atomic_write(path) as tmp:
        with exportable_attention(module) as n_acmix, torch.no_grad(), \
                warnings.catch_warnings():
            # The tracer warns about every Python int taken from a shape: by design here
            # (fixed-size export, see the module docstring).
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.simplefilter('ignore', DeprecationWarning)
            warnings.simplefilter('ignore', FutureWarning)
            warnings.simplefilter('ignore', UserWarning)
            try:
                if exporter == 'torchscript':
                    torch.onnx.export(module, (inputs,), tmp, dynamo=False, opset_version=opset,
                                      input_names=['input'], output_names=list(output_names),
                                      do_constant_folding=True, dynamic_axes=dynamic_axes)
                else:  # one self-contained file, static shapes (see the module docstring)
                    torch.onnx.export(module, (inputs,), tmp, dynamo=True, opset_version=opset,
                                      input_names=['input'], output_names=list(output_names),
                                      external_data=False, optimize=True, verbose=False)
            except Exception as err:  # the exporter's messages can hold a whole graph dump
                message = str(err)
                if len(message) > 2000:
                    message = message[:2000] + ' ...'
                raise ExportError(f'torch.onnx.export ({exporter} exporter, opset {opset}) '
                                  f'failed: {type(err).__name__}: {message}') from None
        proto = onnx.load(tmp)
        if metadata:
            onnx.helper.set_model_props(proto, dict(metadata))
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        if verify is not None:
            verify(tmp)
    return n_acmix, opset


# --------------------------------------------------------------------------- parity
@dataclasses.dataclass
class ParityReport:
    """onnxruntime vs PyTorch, per output and overall.

    ``rel`` is the max abs difference divided by max(1, the output's largest magnitude): an
    absolute error for outputs of magnitude <= 1, relative to the output's scale beyond.
    """
    names: List[str]
    max_abs: List[float]
    rel: List[float]

    @property
    def worst_abs(self) -> float:
        return max(self.max_abs) if self.max_abs else 0.0

    @property
    def worst_rel(self) -> float:
        return max(self.rel) if self.rel else 0.0

    def passed(self, tolerance: float = TOLERANCE) -> bool:
        """True when every output's ``rel`` is at most ``tolerance`` (and nothing is NaN)."""
        return all(r <= tolerance for r in self.rel)

    def summary(self) -> str:
        lines = [f'  {n}: max abs diff {a:.3e}, rel {r:.3e}'
                 for n, a, r in zip(self.names, self.max_abs, self.rel)]
        lines.append(f'  worst: max abs diff {self.worst_abs:.3e}, rel {self.worst_rel:.3e}')
        return '\n'.join(lines)


def run_onnxruntime(path: str, inputs: torch.Tensor, threads: int = 0) -> List[Any]:
    """Run the ONNX file on onnxruntime's CPU execution provider; returns numpy arrays."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no graph-optimisation chatter
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})


def compare_outputs(names: Sequence[str], reference: Sequence[torch.Tensor],
                    got: Sequence[Any]) -> ParityReport:
    """Differences between PyTorch's outputs and onnxruntime's (same order)."""
    import numpy as np

    if len(reference) != len(got):
        raise ExportError(f'onnxruntime returned {len(got)} outputs, PyTorch {len(reference)}')
    max_abs, rel = [], []
    for name, ref, out in zip(names, reference, got):
        ref = ref.detach().cpu().numpy()
        if ref.shape != out.shape:
            raise ExportError(f'output {name}: onnxruntime shape {out.shape} vs PyTorch '
                              f'{ref.shape}')
        diff = float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()) \
            if ref.size else 0.0
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
        if math.isnan(diff):
            diff = math.inf
        max_abs.append(diff)
        rel.append(diff / scale)
    return ParityReport(list(names), max_abs, rel)
