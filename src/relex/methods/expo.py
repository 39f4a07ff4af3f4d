"""ExPO (Zheng et al., 2025, "Model extrapolation expedites alignment"): one fixed step past the cutoff.

theta = theta_cut + alpha * (theta_cut - theta_0) for every tensor, i.e. W_0 + (1 + alpha) * Delta_cut:
a weighted sum with weight 1 + alpha on the cutoff delta. It is two-point extrapolation from the base
to the step c * (1 + alpha) for a cutoff step c, with alpha fixed instead of taken from a target step.

The original computes in the checkpoint's dtype (bf16) without upcasting: alpha * (theta_cut - theta_0)
is rounded to bf16 before the sum, which is rounded again, so an entry can land one bf16 ulp off the
correctly rounded value. relex reads the exact deltas, sums in float64 and rounds once to the output
dtype; with ``--dtype float32`` the part of the update below a bf16 ulp is kept too.

ExPO has no notion of a target step, so relex takes exactly one ``--target``: it only names the
output folder (``step-T``) and is recorded in ``relex.json``; several targets would be identical copies
and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from relex.errors import RelexError
from relex.methods.base import Method, option
from relex.stats.gram import TensorStats


@dataclass(eq=False, kw_only=True)
class ExPO(Method):
    """theta_cut + alpha (theta_cut - theta_0), fixed alpha; needs only the cutoff checkpoint."""

    name = "expo"
    min_checkpoints = 1

    alpha: float = option(0.3, "expo: theta_cut + ALPHA (theta_cut - theta_0) (default %(default)s; the paper also "
                               "suggests 0.5); --target only names the output", type=float)

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise RelexError(f"expo alpha {self.alpha} must be a finite number")
        self.alpha = float(self.alpha)

    def check_targets(self, targets: Sequence[int], observed_steps: Sequence[int]) -> None:
        super().check_targets(targets, observed_steps)
        if len(targets) > 1:
            raise RelexError(f"expo ignores the target step (alpha={self.alpha} is fixed), so {len(targets)} "
                             "targets would be identical copies: give one --target (it names the output)")

    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        out = np.zeros((len(targets), len(stats.steps)))
        out[:, -1] = 1.0 + self.alpha
        return out
