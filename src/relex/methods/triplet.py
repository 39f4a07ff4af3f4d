"""The top singular triplet of a matrix reached only through its row blocks (AlphaRL's and NExt's rank-1 factors).

A delta too big for the memory budget is never whole in memory: ``DeltaDifference`` gives it block by block
from ``relex.trajectory.TensorDeltas`` (one read of the checkpoints' rows per visit), and the subspace
iteration needs only D Q and D^T (D Q), which are sums over row blocks. A dense tensor is the one-block case,
with the same arithmetic, so a tensor that fits the budget gets the same triplet either way up to rounding.
A difference of deltas stored as low-rank factors (LoRA adapters: ``TensorDeltas.factors``) needs no
iteration: its triplet is exact from two thin QRs and the SVD of a small core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from relex.trajectory import StackedDeltas, TensorDeltas

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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right) with left @ right = the difference, when every delta in it is stored as factors."""
        later = self.deltas.factors(self.later)
        if later is None or self.earlier is None:
            return later
        earlier = self.deltas.factors(self.earlier)
        if earlier is None:
            return None
        return torch.cat([later[0], -earlier[0]], dim=1), torch.cat([later[1], earlier[1]], dim=0)

    def in_memory(self) -> DenseMatrix | None:
        """The difference as one matrix when the deltas are a stack in memory: subtracted once, where every visit
        of the row blocks would subtract (and allocate) it again (measured: 4x the time on a 49152 x 576 tensor)."""
        if not isinstance(self.deltas, StackedDeltas):
            return None
        [block] = self.deltas.blocks([self.later] if self.earlier is None else [self.later, self.earlier])
        return DenseMatrix(block.deltas[0] if self.earlier is None else block.deltas[0] - block.deltas[1])

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        wanted = [self.later] if self.earlier is None else [self.later, self.earlier]
        for block in self.deltas.blocks(wanted):
            d = block.deltas[0] if self.earlier is None else block.deltas[0] - block.deltas[1]
            yield block.start, block.stop, d


def _is_zero(matrix: RowBlockMatrix) -> bool:
    return not any(bool(torch.any(d != 0)) for _, _, d in matrix.row_blocks())


def low_rank_triplet(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor, bool]:
    """(u, s, v, True) of the largest singular value of left @ right (m x r times r x n), exactly: with
    left = Q_l R_l and right^T = Q_r R_r, the product is Q_l (R_l R_r^T) Q_r^T, so the r x r core's top
    singular pair, mapped back through Q_l and Q_r, is the product's. Zeros for a zero product."""
    m, n = left.shape[0], right.shape[1]
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    if r_left.numel() and r_right.numel():
        u, s, vh = torch.linalg.svd(r_left @ r_right.T)
        if float(s[0]) > 0:
            return q_left @ u[:, 0], float(s[0]), q_right @ vh[0], True
    return (torch.zeros(m, dtype=torch.float64, device=left.device), 0.0,
            torch.zeros(n, dtype=torch.float64, device=left.device), True)


def top_singular_triplet(matrix: torch.Tensor | RowBlockMatrix, start: torch.Tensor | None = None,
                         block: int = BLOCK, max_iter: int = MAX_ITER, tol: float = RESIDUAL_TOL
                         ) -> tuple[torch.Tensor, float, torch.Tensor, bool]:
    """(u, s, v, converged) of the largest singular value of an m x n float64 matrix (a tensor, or row blocks).

    Block subspace iteration on D^T D with a Rayleigh-Ritz step (the eigenpairs of a k x k Gram), one visit
    of the rows per step: each block adds its rows of B = D Q and its share D_b^T B_b of Z = D^T D Q.
    ``start`` (e.g. the previous checkpoint's v) is the first column of the starting block, the rest are
    seeded random, so results are deterministic. Exact after one or two steps when min(m, n) <= k. Stops on
    the triplet's residual ||D^T u - s v|| / s <= ``tol``. A zero matrix gives zeros. A ``DeltaDifference`` of
    deltas stored as factors takes ``low_rank_triplet`` instead, and never visits the rows.
    """
    if isinstance(matrix, torch.Tensor):
        matrix = DenseMatrix(matrix)
    if isinstance(matrix, DeltaDifference):
        factors = matrix.factors()
        if factors is not None:
            return low_rank_triplet(*factors)
        matrix = matrix.in_memory() or matrix
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
