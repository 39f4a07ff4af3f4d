"""Two-point weight extrapolation (Wang et al., 2026) on real step numbers, in fp32/fp64.

W_T = W_a + (T - a) / (c - a) * (W_c - W_a) for an anchor step a (0 = the base) and the cutoff
checkpoint c; in deltas from the base that is r * Delta_c + (1 - r) * Delta_a.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from relex.errors import RelexError
from relex.methods.base import Method
from relex.stats.gram import TensorStats


class TwoPoint(Method):
    """Straight line through the anchor (default: the base) and the last observed checkpoint."""

    name = "two-point"

    def __init__(self, cutoff: int | None = None, anchor: int = 0) -> None:
        super().__init__(cutoff)
        self.anchor = anchor

    def params(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "anchor": self.anchor}

    @classmethod
    def from_args(cls, args):
        return cls(cutoff=args.cutoff, anchor=args.anchor)

    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        steps = [int(s) for s in stats.steps]
        last = steps[-1]
        if self.anchor != 0 and self.anchor not in steps:
            raise RelexError(f"two-point anchor step {self.anchor} is not an observed step")
        if self.anchor >= last:
            raise RelexError(f"two-point anchor {self.anchor} must be before the cutoff step {last}")
        out = np.zeros((len(targets), len(steps)))
        for j, target in enumerate(targets):
            ratio = (target - self.anchor) / (last - self.anchor)
            out[j, -1] += ratio
            if self.anchor:
                out[j, steps.index(self.anchor)] += 1.0 - ratio
        return out
