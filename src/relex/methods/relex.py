"""RELEX (Algorithm 2) and the rank-r reconstruction of the observed window (Algorithm 1).

Per tensor, the compact SVD of the delta stack M comes from its Gram matrix: G = U diag(sigma^2) U^T,
v_k = M^T u_k / sigma_k and c_k = sigma_k u_k. A line c_k(t) = a_k t + b_k fit on the real steps
predicts Delta_T = sum_k (a_k T + b_k) v_k = M^T alpha with alpha = sum_k (a_k T + b_k) u_k / sigma_k.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from relex.errors import RelexError
from relex.methods.base import Method
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


class Relex(Method):
    """Rank-r subspace of the observed deltas, each coefficient extrapolated by a trend in the step.

    ``trend`` is the paper's ``linear`` by default (see ``relex.methods.trends``); ``anchor`` takes the
    deltas from an observed checkpoint instead of the base (a window offset).
    """

    name = "relex"
    shared_flags = ("rank", "anchor")

    def __init__(self, rank: int = 1, cutoff: int | None = None, trend: str = "linear", anchor: int = 0) -> None:
        super().__init__(cutoff)
        if rank < 1:
            raise RelexError(f"rank {rank} must be >= 1")
        if trend not in TRENDS:
            raise RelexError(f"unknown trend {trend!r}: choose one of {', '.join(TRENDS)}")
        self.rank = rank
        self.trend = trend
        self.anchor = anchor

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank, "cutoff": self.cutoff, "trend": self.trend, "anchor": self.anchor}

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--trend", default="linear", choices=sorted(TRENDS),
                            help="relex: trend family of the coefficients (default linear, as the paper)")

    @classmethod
    def from_args(cls, args):
        return cls(rank=args.rank, cutoff=args.cutoff, trend=args.trend, anchor=args.anchor)

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


class Reconstruct(Method):
    """Rank-r projection of each observed checkpoint onto the trajectory's top-r subspace."""

    name = "reconstruct"
    shared_flags = ("rank",)

    def __init__(self, rank: int = 1, cutoff: int | None = None) -> None:
        super().__init__(cutoff)
        if rank < 1:
            raise RelexError(f"rank {rank} must be >= 1")
        self.rank = rank

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank, "cutoff": self.cutoff}

    @classmethod
    def from_args(cls, args):
        return cls(rank=args.rank, cutoff=args.cutoff)

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
