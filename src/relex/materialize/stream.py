"""Read one tensor's delta stack from every observed checkpoint, in row blocks that fit a memory budget.

A block of rows r0:r1 becomes a T x n float32 matrix of deltas W_t - W_0, computed in fp32 from the
stored dtype (exact for bf16). Only that block and a few per-element temporaries are alive at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from relex.errors import RelexError
from relex.stats.gram import GRAM_CHUNK_ELEMENTS, TensorStats, gram_of
from relex.trajectory import TensorSpec, Trajectory

FIXED_OVERHEAD = 8 * GRAM_CHUNK_ELEMENTS + (16 << 20)  # Gram chunk temporaries plus slack


class DeltaStream:
    """Block planning and block reads for the tensors of an observed trajectory."""

    def __init__(self, trajectory: Trajectory, memory_budget: int, device: str = "cpu") -> None:
        self.trajectory = trajectory
        self.base = trajectory.reader(trajectory.base)
        self.readers = [trajectory.reader(c.path) for c in trajectory.checkpoints]
        self.steps = np.array(trajectory.steps, dtype=np.float64)
        self.budget = memory_budget
        self.device = torch.device(device)

    def bytes_per_element(self, spec: TensorSpec, n_outputs: int = 1) -> int:
        """Live bytes per tensor element: the fp32 stack, fp32 base, read buffers, fp64 sum, output."""
        return 4 * len(self.readers) + 4 + 2 * spec.dtype.itemsize + 8 + n_outputs * spec.dtype.itemsize

    def blocks(self, spec: TensorSpec, n_outputs: int = 1) -> list[tuple[int, int]]:
        """Row ranges whose stacks fit the budget (one range when the whole tensor fits)."""
        per_row = self.bytes_per_element(spec, n_outputs) * max(spec.row_numel, 1)
        rows_per_block = max(1, (self.budget - FIXED_OVERHEAD) // per_row)
        return [(r0, min(r0 + rows_per_block, spec.rows)) for r0 in range(0, spec.rows, rows_per_block)] or [(0, 0)]

    def read(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(deltas as a T x n float32 stack, the base block in its stored dtype) for rows r0:r1."""
        base = self.base.read(name, r0, r1).to(self.device)
        base32 = base.reshape(-1).to(torch.float32)
        stack = torch.empty(len(self.readers), base32.numel(), dtype=torch.float32, device=self.device)
        for i, reader in enumerate(self.readers):
            row = stack[i]
            row.copy_(reader.read(name, r0, r1).reshape(-1))
            row.sub_(base32)
        return stack, base

    def stats(self, name: str, spec: TensorSpec, stack: torch.Tensor | None = None) -> TensorStats:
        """Gram statistics of a tensor: from a stack already read, or block by block."""
        if stack is not None:
            gram = gram_of(stack)
        else:
            gram = torch.zeros(len(self.readers), len(self.readers), dtype=torch.float64, device=self.device)
            for r0, r1 in self.blocks(spec, n_outputs=0):
                gram += gram_of(self.read(name, r0, r1)[0])
        stats = TensorStats(self.steps.copy(), gram.cpu().numpy())
        self._check_finite(name, spec, stats)
        return stats

    def _check_finite(self, name: str, spec: TensorSpec, stats: TensorStats) -> None:
        """NaN/Inf anywhere in a delta shows on the Gram diagonal: name the file that holds it."""
        bad = ~np.isfinite(np.diag(stats.gram))
        if not bad.any():
            return
        base_bad = any(not torch.isfinite(self.base.read(name, r0, r1).float()).all()
                       for r0, r1 in self.blocks(spec, n_outputs=0))
        culprit = self.base if base_bad else self.readers[int(np.flatnonzero(bad)[0])]
        raise RelexError(f"{culprit.file_of(name)}: tensor '{name}' contains NaN or Inf")


def weighted_sum(stack: torch.Tensor, base: torch.Tensor, weights: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """W_0 + sum_t weights[t] * Delta_t, summed in float64 and cast once to ``dtype``."""
    acc = base.reshape(-1).to(torch.float64)
    for i, w in enumerate(weights):
        if w != 0.0:
            acc.add_(stack[i], alpha=float(w))
    return acc.to(dtype).reshape(base.shape)
