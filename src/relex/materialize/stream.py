"""Read one tensor's delta stack from every observed checkpoint, in row blocks that fit a memory budget.

A block of rows r0:r1 becomes a T x n float64 matrix of deltas W_t - W_0. Upcasting bf16, fp16 or
fp32 to float64 is exact and so is the subtraction: the deltas are the stored values' exact
differences, and the Gram matrix and weighted sums are reduced in float64. Every reader gives its
delta (``read_delta``): a LoRA checkpoint's is B @ A * scale, never a rounded W_0 + delta minus W_0.
The stack lives in a reused buffer (no per-tensor allocation), so memory stays at the budget whatever
the model size.
"""

from __future__ import annotations

import numpy as np
import torch

from relex.errors import RelexError
from relex.materialize.rounding import cast_into
from relex.stats.gram import TensorStats, gram_of
from relex.trajectory import TensorDeltas, TensorSpec, Trajectory

FIXED_OVERHEAD = 64 << 20  # slack for small temporaries and allocator fragmentation


class DeltaStream:
    """Block planning and block reads for the tensors of an observed trajectory."""

    def __init__(self, trajectory: Trajectory, memory_budget: int, device: str = "cpu", n_outputs: int = 0) -> None:
        self.trajectory = trajectory
        self.base = trajectory.reader(trajectory.base)
        self.readers = [trajectory.reader(c.path) for c in trajectory.checkpoints]
        self.steps = np.array(trajectory.steps, dtype=np.float64)
        self.budget = memory_budget
        self.n_outputs = n_outputs  # targets written per tensor: their sums share the budget with the stack
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def bytes_per_element(self, spec: TensorSpec) -> int:
        """Live bytes per tensor element: the fp64 stack and base, the read buffer, fp64 sums, an output."""
        return 8 * (len(self.readers) + 1) + spec.dtype.itemsize + self.n_outputs * 8 + 8

    def blocks(self, spec: TensorSpec) -> list[tuple[int, int]]:
        """Row ranges whose stacks fit the budget (one range when the whole tensor fits)."""
        per_row = self.bytes_per_element(spec) * max(spec.row_numel, 1)
        rows_per_block = max(1, (self.budget - FIXED_OVERHEAD) // per_row)
        return [(r0, min(r0 + rows_per_block, spec.rows)) for r0 in range(0, spec.rows, rows_per_block)] or [(0, 0)]

    def buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
               device: torch.device | None = None) -> torch.Tensor:
        """A view of a reused buffer that only ever grows: no allocation or page faults per tensor."""
        numel = 1
        for d in shape:
            numel *= d
        have = self._buffers.get(key)
        if have is None or have.numel() < numel:
            self._buffers.pop(key, None)
            have = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device or self.device)
        return have[:numel].view(shape)

    def read(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(deltas as a T x n float64 stack, the base block as float64, flat) for rows r0:r1."""
        spec = self.base.specs[name]
        raw = self.buffer("raw", ((r1 - r0) * spec.row_numel * spec.dtype.itemsize,), torch.uint8, torch.device("cpu"))
        block = self.base.read(name, r0, r1, raw).reshape(-1)
        base = self.buffer("base", (block.numel(),))
        base.copy_(block)
        stack = self.buffer("stack", (len(self.readers), block.numel()))
        for i, reader in enumerate(self.readers):
            reader.read_delta(name, r0, r1, base=base, out=stack[i], buffer=raw)
        return stack, base

    def stats(self, name: str, spec: TensorSpec, stack: torch.Tensor | None = None) -> TensorStats:
        """Gram statistics of a tensor: from a stack already read, or block by block."""
        if stack is not None:
            gram = gram_of(stack)
        else:
            gram = sum(gram_of(self.read(name, r0, r1)[0]) for r0, r1 in self.blocks(spec))
        return self.checked_stats(name, spec, gram.cpu().numpy())

    def checked_stats(self, name: str, spec: TensorSpec, gram: np.ndarray) -> TensorStats:
        """Statistics of a tensor's Gram matrix (summed here or by Ray tasks), refusing NaN or Inf by file."""
        stats = TensorStats(self.steps.copy(), gram, name, spec.shape)
        self._check_finite(name, spec, stats)
        return stats

    def _check_finite(self, name: str, spec: TensorSpec, stats: TensorStats) -> None:
        """NaN/Inf anywhere in a delta shows on the Gram diagonal: name the file that holds it."""
        bad = ~np.isfinite(np.diag(stats.gram))
        if not bad.any():
            return
        base_bad = any(not torch.isfinite(self.base.read(name, r0, r1).float()).all()
                       for r0, r1 in self.blocks(spec))
        culprit = self.base if base_bad else self.readers[int(np.flatnonzero(bad)[0])]
        raise RelexError(f"{culprit.file_of(name)}: tensor '{name}' contains NaN or Inf")

    def deltas(self, name: str) -> TensorDeltas:
        """One tensor's deltas, one checkpoint at a time (for methods that are not weighted sums)."""
        spec = self.base.specs[name]
        raw = self.buffer("raw", (spec.numel * spec.dtype.itemsize,), torch.uint8, torch.device("cpu"))
        return self.trajectory.deltas(name, self.device, raw)

    def weighted_sums(self, stack: torch.Tensor, base: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        """W_0 + sum_t weights[j, t] Delta_t for every row j of ``weights``, in float64."""
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64)).to(self.device)
        out = self.buffer("sums", (w.shape[0], stack.shape[1]))
        torch.mm(w, stack, out=out)
        return out.add_(base)

    def cast(self, values: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """``values`` rounded once to the output dtype in a reused buffer (no allocation per tensor)."""
        out = self.buffer(f"out-{dtype}", (values.numel(),), dtype)
        return cast_into(out, values.reshape(-1)).view(shape)

