"""Per-tensor statistics of a trajectory: the Gram matrix of its deltas, from which every method fits.

For deltas stacked as rows of M (T x d), G = M M^T (T x T, float64) holds all inner products
<Delta_i, Delta_j>. Its eigendecomposition gives the compact SVD of M (sigma_k^2 and u_k), and any
prediction that is a weighted sum of deltas has its norm and its distance to any observed delta in
closed form, so fits, diagnostics and backtests never need the weights again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class TensorStats:
    """Gram matrix of one tensor's deltas ``W_t - W_0`` at ``steps`` (all float64).

    ``name`` and ``shape`` say which tensor it describes (None when unknown, e.g. in unit tests), for
    methods whose rule depends on the tensor, such as two-point's norms copied from the cutoff.
    """

    steps: np.ndarray
    gram: np.ndarray
    name: str | None = None
    shape: tuple[int, ...] | None = None

    def subset(self, steps: list[int] | np.ndarray) -> "TensorStats":
        """The statistics of a subset of the steps (e.g. a shorter cutoff): a sub-block of G."""
        index = {int(s): i for i, s in enumerate(self.steps)}
        idx = np.array([index[int(s)] for s in steps], dtype=np.int64)
        return TensorStats(self.steps[idx].astype(np.float64), self.gram[np.ix_(idx, idx)], self.name, self.shape)

    def named(self, name: str, shape: tuple[int, ...]) -> "TensorStats":
        """The same statistics tagged with the tensor they describe (e.g. after loading from the cache)."""
        return replace(self, name=name, shape=tuple(shape))

    def spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues sigma_k^2 (descending, clipped at 0) and eigenvectors u_k (columns) of G.

        Signs are fixed so that the coefficient c_k = sigma_k u_k is positive at the last observed
        step (or, when that entry is zero, at its largest entry): results are deterministic.
        """
        values, vectors = np.linalg.eigh(self.gram)
        order = np.argsort(values)[::-1]
        values = np.clip(values[order], 0.0, None)
        vectors = vectors[:, order]
        for k in range(vectors.shape[1]):
            col = vectors[:, k]
            pivot = col[-1] if abs(col[-1]) > 1e-12 * np.abs(col).max(initial=0.0) else col[np.abs(col).argmax()]
            if pivot < 0:
                vectors[:, k] = -col
        return values, vectors

    @property
    def delta_norms(self) -> np.ndarray:
        """||W_t - W_0|| for each observed step."""
        return np.sqrt(np.clip(np.diag(self.gram), 0.0, None))


def whole_model(stats: dict[str, TensorStats]) -> TensorStats:
    """The statistics of all tensors as one vector: the sum of their Gram matrices."""
    return TensorStats(next(iter(stats.values())).steps, sum(s.gram for s in stats.values()))


def gram_of(stack: torch.Tensor) -> torch.Tensor:
    """G = M M^T of a T x n float64 stack (one matmul; the engine hands it cache-sized chunks of columns)."""
    return stack @ stack.T
