"""Small utilities shared by tools and tests (nothing here is needed to build a model)."""
from .memory import PeakMemory, measure_peak_memory

__all__ = ['PeakMemory', 'measure_peak_memory']
