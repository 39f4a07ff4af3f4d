"""RELEX (Algorithm 2) and the rank-r reconstruction of the observed window (Algorithm 1).

Per tensor, the compact SVD of the delta stack M comes from its Gram matrix: G = U diag(sigma^2) U^T,
v_k = M^T u_k / sigma_k and c_k = sigma_k u_k. A line c_k(t) = a_k t + b_k fit on the real steps
predicts Delta_T = sum_k (a_k T + b_k) v_k = M^T alpha with alpha = sum_k (a_k T + b_k) u_k / sigma_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from relex.errors import RelexError
from relex.methods.base import Method, option
from relex.methods.anchor import anchored_weights
from relex.methods.trends import TRENDS, fit_trend
from relex.stats.gram import TensorStats

# Components with sigma_k^2 below this fraction of sigma_1^2 are numerical noise of the Gram route.
RELATIVE_EIGEN_TOL = 1e-13


def kept_components(stats: TensorStats, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``rank`` eigenpairs of G that are numerically non-zero (none when all deltas are zero)."""
    values, vectors = stats.spectrum()
    if values.size == 0 or values[0] <= 0:
        return values[:0], vectors[:, :0]
    keep = min(rank, int((values > values[0] * RELATIVE_EIGEN_TOL).sum()))
    return values[:keep], vectors[:, :keep]


@dataclass(eq=False, kw_only=True)
class Relex(Method):
    """Rank-r subspace of the observed deltas, each coefficient extrapolated by a trend in the step.

    ``trend`` is the paper's ``linear`` by default (see ``relex.methods.trends``); ``anchor`` takes the
    deltas from an observed checkpoint instead of the base (a window offset).
    """

    name = "relex"

    rank: int = option(1, shared=True)
    trend: str = option("linear", "relex: trend family of the coefficients (default %(default)s, as the paper)",
                        flag="--trend", choices=sorted(TRENDS))
    anchor: int = option(0, shared=True)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RelexError(f"rank {self.rank} must be >= 1")
        if self.trend not in TRENDS:
            raise RelexError(f"unknown trend {self.trend!r}: choose one of {', '.join(TRENDS)}")

    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        return anchored_weights(stats, targets, self.anchor, self._weights)

    def _weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        values, vectors = kept_components(stats, self.rank)
        out = np.zeros((len(targets), len(stats.steps)))
        for k in range(values.size):
            sigma = np.sqrt(values[k])
            predicted = fit_trend(self.trend, stats.steps, sigma * vectors[:, k])(np.asarray(targets, dtype=np.float64))
            out += np.outer(predicted / sigma, vectors[:, k])
        return out


@dataclass(eq=False, kw_only=True)
class Reconstruct(Method):
    """Rank-r projection of each observed checkpoint onto the trajectory's top-r subspace."""

    name = "reconstruct"

    rank: int = option(1, shared=True)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RelexError(f"rank {self.rank} must be >= 1")

    def check_targets(self, targets: Sequence[int], observed_steps: Sequence[int]) -> None:
        missing = [t for t in targets if t not in set(observed_steps)]
        if missing:
            raise RelexError(f"reconstruct target {missing[0]} is not an observed step "
                             f"(observed: {', '.join(map(str, observed_steps))})")

    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        _, vectors = kept_components(stats, self.rank)
        index = {int(s): i for i, s in enumerate(stats.steps)}
        projector = vectors @ vectors.T  # U_r U_r^T: row i gives the coefficients of step i's projection
        return np.stack([projector[index[int(t)]] for t in targets])
