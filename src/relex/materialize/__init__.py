"""Materializer: the one streaming pass that turns method weights into written model folders."""

from relex.materialize.engine import compute_stats, extrapolate

__all__ = ["compute_stats", "extrapolate"]
