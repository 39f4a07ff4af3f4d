"""Analysis: diagnostics of a trajectory computed from its Gram statistics."""

from relex.analysis.alignment import alignment
from relex.analysis.metrics import TensorMetrics, summarize, tensor_metrics

__all__ = ["TensorMetrics", "alignment", "summarize", "tensor_metrics"]
