"""Export requests: parts, exporters, opsets, the parity tolerance, and their checks."""
from __future__ import annotations

from typing import Any, Sequence, Tuple

__all__ = ['PARTS', 'EXPORTERS', 'OPSET_RANGE', 'DEFAULT_OPSET', 'TOLERANCE', 'ExportError', 'check_shape',
           'check_exporter', 'check_opset']

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

