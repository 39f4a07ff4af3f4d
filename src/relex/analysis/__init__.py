"""Analysis: diagnostics of a trajectory computed from its Gram statistics."""

from relex.analysis.alignment import alignment

__all__ = ["alignment"]
