"""Methods: each maps per-tensor statistics to weights on the observed deltas."""

from relex.methods.base import DirectMethod, Method
from relex.methods.relex import Reconstruct, Relex
from relex.methods.twopoint import TwoPoint

METHODS: dict[str, type[Method]] = {m.name: m for m in (Relex, Reconstruct, TwoPoint)}

__all__ = ["METHODS", "DirectMethod", "Method", "Reconstruct", "Relex", "TwoPoint"]
