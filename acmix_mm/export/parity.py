"""The parity check: onnxruntime's outputs against PyTorch's."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Sequence

import torch

from .common import TOLERANCE, ExportError

__all__ = ['ParityReport', 'run_onnxruntime', 'compare_outputs']


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
