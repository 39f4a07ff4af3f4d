"""The top singular triplet of a matrix reached only through its row blocks (AlphaRL's and NExt's rank-1 factors).

A delta too big for the memory budget is never whole in memory: ``DeltaDifference`` gives it block by block
from ``relex.trajectory.TensorDeltas`` (one read of the checkpoints' rows per visit), and the subspace
iteration needs only D Q and D^T (D Q), which are sums over row blocks. A dense tensor is the one-block case,
with the same arithmetic, so a tensor that fits the budget gets the same triplet either way up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from relex.trajectory import TensorDeltas

BLOCK = 4          # subspace size of the iteration (the top vector converges at sigma_{BLOCK+1} / sigma_1)
MAX_ITER = 300
RESIDUAL_TOL = 1e-10

Triplet = tuple[torch.Tensor, float, torch.Tensor]


class RowBlockMatrix(Protocol):
    """An m x n float64 matrix visited as row blocks: (r0, r1, rows r0:r1), in order, covering every row."""

    shape: tuple[int, int]
    device: torch.device

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]: ...


@dataclass(frozen=True)
class DenseMatrix:
    """A matrix in memory: one block."""

    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        yield 0, self.values.shape[0], self.values


@dataclass(frozen=True)
class DeltaDifference:
    """Delta_later - Delta_earlier of one tensor (Delta_later itself when ``earlier`` is None), in row blocks."""

    deltas: TensorDeltas
    later: int
    earlier: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.deltas.shape

    @property
    def device(self) -> torch.device:
        return self.deltas.device

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        wanted = [self.later] if self.earlier is None else [self.later, self.earlier]
        for block in self.deltas.blocks(wanted):
            d = block.deltas[0] if self.earlier is None else block.deltas[0] - block.deltas[1]
            yield block.start, block.stop, d


def _is_zero(matrix: RowBlockMatrix) -> bool:
    return not any(bool(torch.any(d != 0)) for _, _, d in matrix.row_blocks())


def top_singular_triplet(matrix: torch.Tensor | RowBlockMatrix, start: torch.Tensor | None = None,
                         block: int = BLOCK, max_iter: int = MAX_ITER, tol: float = RESIDUAL_TOL
                         ) -> tuple[torch.Tensor, float, torch.Tensor, bool]:
    """(u, s, v, converged) of the largest singular value of an m x n float64 matrix (a tensor, or row blocks).

    Block subspace iteration on D^T D with a Rayleigh-Ritz step (the eigenpairs of a k x k Gram), one visit
    of the rows per step: each block adds its rows of B = D Q and its share D_b^T B_b of Z = D^T D Q.
    ``start`` (e.g. the previous checkpoint's v) is the first column of the starting block, the rest are
    seeded random, so results are deterministic. Exact after one or two steps when min(m, n) <= k. Stops on
    the triplet's residual ||D^T u - s v|| / s <= ``tol``. A zero matrix gives zeros.
    """
    if isinstance(matrix, torch.Tensor):
        matrix = DenseMatrix(matrix)
    (m, n), device = matrix.shape, matrix.device
    zeros = (torch.zeros(m, dtype=torch.float64, device=device), 0.0,
             torch.zeros(n, dtype=torch.float64, device=device))
    k = min(block, m, n)
    if k == 0:
        return (*zeros, True)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, k, generator=gen, dtype=torch.float64).to(device)
    if start is not None and bool(torch.any(start != 0)):
        q[:, 0] = start
    q = torch.linalg.qr(q).Q
    b = torch.empty(m, k, dtype=torch.float64, device=device)
    s = 0.0
    for _ in range(max_iter):
        z = None
        for r0, r1, d in matrix.row_blocks():
            torch.mm(d, q, out=b[r0:r1])
            part = (b[r0:r1].T @ d).T  # not d.T @ b: torch's CPU path for that is 12x slower on a tall block
            z = part if z is None else z.add_(part)   # D^T D Q: the residual and the next block
        values, vectors = torch.linalg.eigh(b.T @ b)  # Ritz values s^2, ascending
        s = float(values[-1].clamp(min=0.0).sqrt())
        if s == 0.0:
            if _is_zero(matrix):
                return (*zeros, True)
            q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64).to(q)).Q
            continue
        w = vectors[:, -1]
        v = q @ w
        u = (b @ w) / s
        residual = float(torch.linalg.vector_norm(z @ w / s - s * v)) / s
        if residual <= tol:
            return u, s, v, True
        q = torch.linalg.qr(z).Q
    if s == 0.0:
        return (*zeros, False)
    return u, s, v, False
