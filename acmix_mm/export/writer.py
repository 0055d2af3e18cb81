"""Writing an ONNX file: the exportable attention path, the exporters, metadata, atomic write."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..ops import ACMix
from .common import DEFAULT_OPSET, ExportError, check_exporter, check_opset

__all__ = ['exportable_attention', 'export_onnx']


@contextlib.contextmanager
def exportable_attention(model: nn.Module) -> Iterator[int]:
    """Switch every :class:`acmix_mm.ops.ACMix` in ``model`` to ``attn_impl='unfold'`` and
    ``conv_impl='conv'``.

    The fast paths ('cpp' custom ops, 'triton', 'lean' autograd Function) do not export;
    'unfold' computes the same attention with index_select, slicing, stack and softmax, and
    'conv' the convolution branch with one grouped conv, which export. Yields the number of
    ACMix modules switched; restores their settings on exit.
    """
    saved: List[Tuple[nn.Module, str, str]] = []
    for module in model.modules():
        if isinstance(module, ACMix):
            if not hasattr(module, 'attn_impl'):
                raise ExportError(f'{type(module).__name__} has no attn_impl attribute: cannot '
                                  "select the exportable 'unfold' attention path")
            saved.append((module, module.attn_impl, getattr(module, 'conv_impl', 'conv')))
            module.attn_impl = 'unfold'
            module.conv_impl = 'conv'
    try:
        yield len(saved)
    finally:
        for module, attn_impl, conv_impl in saved:
            module.attn_impl = attn_impl
            module.conv_impl = conv_impl


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
        exporter: ``'torchscript'`` (default; the faster export) or ``'dynamo'`` (torch.export +
            onnxscript; a smaller graph, a much slower export: docs/benchmarks.md).
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
