"""FLOPs of models with ACMix layers.

mmengine's ``FlopAnalyzer`` (fvcore's jit-trace counter, behind ``get_model_complexity_info``)
counts convolutions, matmuls, einsums and norms, but not ACMix's sliding-window attention: that
runs as elementwise products and sums (or a custom autograd kernel), which the tracer skips. An
ACMix layer is therefore counted here from its closed form (:func:`acmix_flops_breakdown`) and the
tracer's partial count inside it is replaced by that.

Convention: like fvcore / mmengine / mmdet's ``get_flops`` and like most backbone papers
(including ACMix's 2.3G / 2.9G / 3.6G for ResNet-ACMix-26/38/50), one "FLOP" is one
multiply-accumulate. Elementwise additions, bias adds, activations and scalings are not counted;
the softmax counts one operation per logit. Multiply by 2 for floating point operations.

Other modules whose work a tracer misses (e.g. the Swin ACMix attention) can add their own
closed form with :func:`register_flop_handler`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..ops import ACMix

__all__ = ['acmix_flops_breakdown', 'count_flops', 'ComplexityReport', 'register_flop_handler',
           'flop_handlers']

# (module, its positional inputs, its output) -> multiply-accumulates of that call.
FlopHandler = Callable[[nn.Module, tuple, Any], int]
_HANDLERS: dict[type, FlopHandler] = {}


def register_flop_handler(module_type: type) -> Callable[[FlopHandler], FlopHandler]:
    """Decorator: count every call of ``module_type`` (and subclasses) with the decorated function
    instead of tracing inside it."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f'register_flop_handler needs an nn.Module subclass, got {module_type!r}')

    def decorator(handler: FlopHandler) -> FlopHandler:
        _HANDLERS[module_type] = handler
        return handler
    return decorator


def flop_handlers() -> dict[type, FlopHandler]:
    """The registered module types and their handlers (a copy)."""
    return dict(_HANDLERS)


def acmix_flops_breakdown(in_channels: int, out_channels: int, height: int, width: int, *,
                          kernel_att: int = 7, head: int = 4, kernel_conv: int = 3,
                          stride: int = 1, batch: int = 1) -> dict[str, int]:
    """Multiply-accumulates of one ACMix call on a (batch, in_channels, height, width) input.

    Terms (C = out_channels, d = C / head, K = kernel_att**2, k = kernel_conv**2,
    N = height * width input positions, M = ceil(height / stride) * ceil(width / stride) outputs):

    - ``qkv``: the three 1x1 projections, 3 * C_in * C * N per image;
    - ``conv_p``: the positional 1x1 conv on the 2-channel coordinate map, 2 * d * N, once
      per call (the map is shared by the batch);
    - ``attn_logits``: q . (k + pe_i - pe_j) for each query, head and window position, C * M * K;
    - ``attn_softmax``: one operation per logit, head * M * K;
    - ``attn_weighted_sum``: sum over the window of a_ij * v_j, C * M * K;
    - ``fc``: 1x1 conv over the 3 * head axis to k maps per head channel, 3 * head * k * d * N;
    - ``dep_conv``: grouped kernel_conv x kernel_conv conv, k inputs per group, C * M * k * k.
    """
    for name, value in (('in_channels', in_channels), ('out_channels', out_channels),
                        ('height', height), ('width', width), ('kernel_att', kernel_att),
                        ('head', head), ('kernel_conv', kernel_conv), ('stride', stride),
                        ('batch', batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'acmix_flops_breakdown: {name} must be a positive int, got {value!r}')
    if out_channels % head:
        raise ValueError(f'acmix_flops_breakdown: out_channels ({out_channels}) must be divisible '
                         f'by head ({head})')
    c, d = out_channels, out_channels // head
    big_k, small_k = kernel_att * kernel_att, kernel_conv * kernel_conv
    n = height * width
    m = math.ceil(height / stride) * math.ceil(width / stride)
    return {
        'qkv': batch * 3 * in_channels * c * n,
        'conv_p': 2 * d * n,
        'attn_logits': batch * c * m * big_k,
        'attn_softmax': batch * head * m * big_k,
        'attn_weighted_sum': batch * c * m * big_k,
        'fc': batch * 3 * head * small_k * d * n,
        'dep_conv': batch * c * m * small_k * small_k,
    }


@register_flop_handler(ACMix)
def _acmix_handler(module: ACMix, inputs: tuple, output: Any) -> int:
    # int(): under jit tracing the sizes are 0-dim tensors.
    b, c_in, h, w = (int(v) for v in inputs[0].shape)
    return sum(acmix_flops_breakdown(
        c_in, module.out_channels, h, w, kernel_att=module.kernel_att, head=module.head,
        kernel_conv=module.kernel_conv, stride=module.dep_conv.stride[0], batch=b).values())


@dataclass
class ComplexityReport:
    """Result of :func:`count_flops`.

    ``flops``: multiply-accumulates of one forward (mmengine's tracer for everything but the
    registered module types, their closed forms for those); ``params``: parameters of the model;
    ``traced_flops``: the tracer's part; ``handled``: closed-form count per handled module name.
    """

    flops: int
    params: int
    traced_flops: int
    handled: dict[str, int] = field(default_factory=dict)

    @property
    def handled_flops(self) -> int:
        return sum(self.handled.values())

    def summary(self) -> str:
        return (f'FLOPs (multiply-accumulates): {self.flops / 1e9:.3f} G '
                f'(traced by mmengine: {self.traced_flops / 1e9:.3f} G; '
                f'{len(self.handled)} ACMix-type module(s) in closed form: '
                f'{self.handled_flops / 1e9:.3f} G)\n'
                f'Params: {self.params / 1e6:.3f} M ({self.params:,})')


def _handler_for(module: nn.Module) -> Optional[FlopHandler]:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def count_flops(model: nn.Module, inputs: tuple) -> ComplexityReport:
    """Count one forward of ``model(*inputs)`` (run under ``torch.no_grad``, in the model's
    current train/eval mode, which should be deterministic: eval for dropout/BN).

    Modules of a registered type (:func:`register_flop_handler`; ACMix by default) are counted
    with their handler; everything else by mmengine's ``FlopAnalyzer``. The model runs twice:
    a plain forward records each handled call's closed-form count and output, then the traced
    forward replays those outputs instead of tracing the handled modules' many small ops (which
    makes tracing slow and which the tracer would not count anyway).
    """
    from mmengine.analysis import FlopAnalyzer

    if not isinstance(inputs, tuple):
        raise TypeError(f'inputs must be a tuple of model arguments, got {type(inputs).__name__}')
    handled_names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if _handler_for(module) is None:
            continue
        # A handled module inside another handled one is already in the outer closed form.
        if any(name.startswith(outer + '.') for outer in handled_names.values()):
            continue
        handled_names[module] = name

    counts: dict[str, int] = {}
    outputs: dict[nn.Module, list] = {m: [] for m in handled_names}

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        name = handled_names[module]
        counts[name] = counts.get(name, 0) + int(_handler_for(module)(module, args, output))
        outputs[module].append(output)

    def replayer(module: nn.Module) -> Callable:
        def replay(*args, **kwargs):
            if not outputs[module]:
                raise RuntimeError(f'count_flops: {handled_names[module]} was called more often '
                                   'in the traced forward than in the plain one; the model\'s '
                                   'forward must be deterministic')
            output = outputs[module].pop(0)
            # Tie the replayed output to the traced inputs: the tracer drops ops whose results
            # nothing uses, which would lose the layers that only feed this module. The tie is
            # a sum and a product, which the tracer does not count.
            tie = sum(a.sum() for a in args if isinstance(a, torch.Tensor))
            return output + 0 * tie if isinstance(output, torch.Tensor) else output
        return replay

    hooks = [m.register_forward_hook(record) for m in handled_names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in hooks:
            handle.remove()
    for module in handled_names:
        module.forward = replayer(module)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The replayed outputs enter the trace as constants; the tracer warns about that.
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            analyzer = FlopAnalyzer(model, inputs)
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            traced = int(analyzer.total())
            by_module = analyzer.by_module()
    finally:
        for module in handled_names:
            del module.forward
    traced_inside = sum(int(by_module.get(name, 0)) for name in counts)
    params = sum(p.numel() for p in model.parameters())
    return ComplexityReport(flops=traced - traced_inside + sum(counts.values()), params=params,
                            traced_flops=traced, handled=counts)


class _TensorForward(nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-argument module for the tracer:
    backbone, neck and heads without post-processing (what mmdet/mmseg's get_flops count)."""

    def __init__(self, model: nn.Module, data_samples: list) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def _dummy_batch(scope: str, height: int, width: int) -> dict:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=meta)
    elif scope == 'mmseg':
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=meta)
    else:
        raise ValueError(f"count_config_flops handles configs with default_scope 'mmdet' or "
                         f"'mmseg', got {scope!r}")
    return dict(inputs=[image], data_samples=[sample])


def count_config_flops(cfg, height: int, width: int) -> ComplexityReport:
    """FLOPs and parameters of the model of an mmdet/mmseg config for one (height, width) image.

    The model is built by :func:`acmix_mm.tool_models.build_tool_model` (SyncBN reverted to
    BN, no ``Pretrained`` file) and put in eval mode; the image goes through the
    model's data preprocessor (so mmdet pads it to its ``pad_size_divisor``), then backbone,
    neck and heads run in ``mode='tensor'``. For two-stage detectors the RoI heads' count
    depends on how many proposals the (randomly initialised) RPN keeps, as in mmdet's tool.
    """
    from mmengine.config import Config

    from ..tool_models import build_tool_model

    if not isinstance(cfg, Config):
        raise TypeError(f'cfg must be an mmengine Config, got {type(cfg).__name__}')
    for name, value in (('height', height), ('width', width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    built = build_tool_model(cfg, seed=0, what='count_config_flops')
    model = built.model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(_dummy_batch(built.scope, height, width), False)
    report = count_flops(_TensorForward(model, data['data_samples']), (data['inputs'],))
    return report
