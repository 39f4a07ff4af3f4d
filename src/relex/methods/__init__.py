"""Methods: each maps per-tensor statistics to weights on the observed deltas (or, DirectMethod, to deltas)."""

from relex.methods.alpharl import AlphaRL
from relex.methods.base import DirectMethod, Method
from relex.methods.expo import ExPO
from relex.methods.next import NExt
from relex.methods.relex import Reconstruct, Relex
from relex.methods.twopoint import TwoPoint

METHODS: dict[str, type[Method]] = {m.name: m for m in (Relex, Reconstruct, TwoPoint, ExPO, AlphaRL, NExt)}

__all__ = ["METHODS", "AlphaRL", "DirectMethod", "ExPO", "Method", "NExt", "Reconstruct", "Relex", "TwoPoint"]
