"""Two-point weight extrapolation (Wang et al., 2026) on real step numbers, in fp32/fp64.

W_T = W_a + (T - a) / (c - a) * (W_c - W_a) for an anchor step a (0 = the base) and the cutoff
checkpoint c; in deltas from the base that is r * Delta_c + (1 - r) * Delta_a. With
``norms_from_cutoff`` (the original code's behaviour) norm weights, the 1-D tensors whose name contains
"norm", are copied from the cutoff checkpoint instead (weight 1 on Delta_c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from relex.errors import RelexError
from relex.methods.base import Method, option
from relex.stats.gram import TensorStats


@dataclass(eq=False, kw_only=True)
class TwoPoint(Method):
    """Straight line through the anchor (default: the base) and the last observed checkpoint."""

    name = "two-point"
    min_checkpoints = 1  # a line through the base and one checkpoint: first-update scaling, W_0 + (T/c)(W_c - W_0)

    anchor: int = option(0, shared=True)
    norms_from_cutoff: bool = option(False, "two-point: copy norm weights (1-D, name contains 'norm') from the "
                                            "cutoff checkpoint instead of extrapolating them, as the original code "
                                            "does")

    @staticmethod
    def is_norm(stats: TensorStats) -> bool:
        """A norm weight: 1-D (when the shape is known) with "norm" in its name."""
        if stats.name is None:
            raise RelexError("two-point norms-from-cutoff needs the tensor's name in its statistics")
        return "norm" in stats.name and (stats.shape is None or len(stats.shape) == 1)

    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        steps = [int(s) for s in stats.steps]
        last = steps[-1]
        if self.anchor != 0 and self.anchor not in steps:
            raise RelexError(f"two-point anchor step {self.anchor} is not an observed step")
        if self.anchor >= last:
            raise RelexError(f"two-point anchor {self.anchor} must be before the cutoff step {last}")
        out = np.zeros((len(targets), len(steps)))
        if self.norms_from_cutoff and self.is_norm(stats):
            out[:, -1] = 1.0
            return out
        for j, target in enumerate(targets):
            ratio = (target - self.anchor) / (last - self.anchor)
            out[j, -1] += ratio
            if self.anchor:
                out[j, steps.index(self.anchor)] += 1.0 - ratio
        return out
