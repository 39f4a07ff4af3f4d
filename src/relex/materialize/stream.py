"""Read one tensor's rows from every observed checkpoint, in row blocks that fit a memory budget.

A block keeps the rows as stored (bf16, fp16 or fp32 bytes) and makes the float64 deltas W_t - W_0 for the
Gram matrix and the weighted sums: all at once, kept for both passes, when the block's float64 stack fits
the budget; else a chunk of columns at a time (32 MB of them, inside the fixed overhead), so that a block
costs its stored bytes, not 8 bytes a value. Upcasting to float64 is exact and so is the subtraction: the
deltas are the stored values' exact differences, and the Gram matrix and weighted sums are reduced in
float64. A LoRA checkpoint's delta (B @ A * scale, ``read_delta``) is float64 already and is kept as such,
never a rounded W_0 + delta minus W_0. Buffers are reused (no per-tensor allocation), so memory stays at
the budget whatever the model size."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from relex.errors import RelexError
from relex.materialize.rounding import cast_into
from relex.stats.gram import TensorStats, gram_of
from relex.trajectory import BufferPool, ReadDeltas, TensorSpec, Trajectory
from relex.units import parse_size

FIXED_OVERHEAD = 64 << 20  # slack for small temporaries and allocator fragmentation
CHUNK_BYTES = 32 << 20     # float64 bytes of one chunk of deltas on the CPU (T+1 x columns), within FIXED_OVERHEAD
SLOW_BUDGET = 2 * FIXED_OVERHEAD  # below it a large tensor is read a few rows per block (measured: 30 min vs 6 s)

log = logging.getLogger(__name__)


def budget_bytes(memory_budget: str | int) -> int:
    """A ``--memory-budget`` in bytes, warning (once per command, not per stream) when it leaves no room for rows."""
    budget = parse_size(memory_budget)
    if 0 < budget < SLOW_BUDGET:
        log.warning("--memory-budget of %d bytes leaves %d for rows beside relex's fixed %d MiB: large tensors are "
                    "read a few rows at a time, which can be hundreds of times slower; give it at least 256MB",
                    budget, max(budget - FIXED_OVERHEAD, 0), FIXED_OVERHEAD >> 20)
    return budget


class Block:
    """Rows r0:r1 of one tensor in the base and every observed checkpoint, with float64 deltas by chunk.

    ``rows`` holds the checkpoints' stored values ((T+1) x n, base first) when every checkpoint stores its
    weights, or their float64 deltas (T x n) when some are adapters (``holds_deltas``). The float64 deltas
    live in ``scratch``: the whole block, or one chunk of columns at a time.
    """

    def __init__(self, rows: torch.Tensor, holds_deltas: bool, base: torch.Tensor, device: torch.device,
                 scratch: torch.Tensor) -> None:
        self.rows, self.holds_deltas, self.base, self.device = rows, holds_deltas, base, device
        self.n_steps = rows.shape[0] - (0 if holds_deltas else 1)
        self.numel = rows.shape[1]
        self.scratch = scratch  # float64, (T+1) x chunk columns: the whole block when the budget holds it
        self._converted = False  # the whole block is in scratch already: later passes skip the conversion

    def chunks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first column, deltas T x c, base c), float64 on the block's device, for every chunk of columns."""
        chunk = self.scratch.shape[1]
        for c0 in range(0, self.numel, chunk):
            c1 = min(c0 + chunk, self.numel)
            work = self.scratch[:, :c1 - c0]
            if not self._converted:
                if self.holds_deltas:
                    work[0].copy_(self.base[c0:c1])
                    work[1:].copy_(self.rows[:, c0:c1])
                else:
                    work.copy_(self.rows[:, c0:c1])
                    work[1:].sub_(work[0])
                self._converted = chunk >= self.numel
            yield c0, work[1:], work[0]

    def gram(self) -> torch.Tensor:
        """G = M M^T of the block's deltas (T x T, float64, on the CPU), summed over the chunks in order."""
        gram = torch.zeros(self.n_steps, self.n_steps, dtype=torch.float64, device=self.device)
        for _, deltas, _ in self.chunks():
            gram += gram_of(deltas)
        return gram.cpu()

    def weighted_sums(self, weights: np.ndarray, outs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Fill flat ``outs[j]`` with W_0 + sum_t weights[j, t] Delta_t, reduced in float64 and rounded once
        to its dtype."""
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64)).to(self.device)
        for c0, deltas, base in self.chunks():
            part = torch.mm(w, deltas).add_(base)
            for j, out in enumerate(outs):
                cast_into(out[c0:c0 + deltas.shape[1]], part[j])
        return outs

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every delta, T x n, and the base, n) in float64, for a block whose scratch holds it whole."""
        [(_, deltas, base)] = list(self.chunks())
        return deltas, base


class DeltaStream:
    """Block planning and block reads for the tensors of an observed trajectory."""

    def __init__(self, trajectory: Trajectory, memory_budget: int, device: str = "cpu", n_outputs: int = 0) -> None:
        self.trajectory = trajectory
        self.base = trajectory.reader(trajectory.base)
        self.readers = [trajectory.reader(c.path) for c in trajectory.checkpoints]
        self.steps = np.array(trajectory.steps, dtype=np.float64)
        self.budget = memory_budget
        self.n_outputs = n_outputs  # targets written per tensor: their values share the budget with the rows
        self.device = torch.device(device)
        self.holds_deltas = not all(r.stores_weights for r in self.readers)
        self._buffers = BufferPool(self.device)
        # files are read side by side (the reads release the GIL): a page-cache copy or a disk queue per core
        self._pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="relex-read")

    def bytes_per_element(self, spec: TensorSpec, stacked: bool = False) -> int:
        """Live bytes per tensor element: the stored rows (float64 deltas for adapters) and the outputs, plus a
        float64 stack of every delta and the base when ``stacked`` (methods that are not weighted sums)."""
        t = len(self.readers)
        rows = spec.dtype.itemsize + (8 * t if self.holds_deltas else spec.dtype.itemsize * t)
        device_copy = rows if self.device.type != "cpu" else 0  # the rows again on the device
        return rows + device_copy + self.n_outputs * 8 + (8 * (t + 1) if stacked else 0)

    def blocks(self, spec: TensorSpec, stacked: bool = False) -> list[tuple[int, int]]:
        """Row ranges whose rows fit the budget (one range when the whole tensor fits)."""
        per_row = self.bytes_per_element(spec, stacked) * max(spec.row_numel, 1)
        rows_per_block = max(1, (self.budget - FIXED_OVERHEAD) // per_row)
        return [(r0, min(r0 + rows_per_block, spec.rows)) for r0 in range(0, spec.rows, rows_per_block)] or [(0, 0)]

    def fits_stacked(self, spec: TensorSpec) -> bool:
        """Whether the whole tensor's float64 stack fits the budget beside its rows (one block, converted once)."""
        return len(self.blocks(spec, stacked=True)) == 1

    def buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
               device: torch.device | None = None) -> torch.Tensor:
        """A view of a reused buffer that only ever grows: no allocation or page faults per tensor."""
        return self._buffers.get(key, shape, dtype, device)

    def load(self, name: str, r0: int, r1: int) -> Block:
        """Rows r0:r1 of tensor ``name`` from the base and every observed checkpoint, read once.

        The rows and the float64 scratch share one buffer, so the largest block sets the memory, not the
        largest rows of one tensor plus the largest scratch of another.
        """
        spec = self.base.specs[name]
        n = (r1 - r0) * spec.row_numel
        t = len(self.readers)
        on_cpu = self.device.type == "cpu"
        whole = not on_cpu or self.fits_stacked(spec)  # converted once, kept for both passes
        columns = max(1, min(n if whole else CHUNK_BYTES // (8 * (t + 1)), n))
        row_dtype, n_rows = (torch.float64, t) if self.holds_deltas else (spec.dtype, t + 1)
        row_bytes = -(-n_rows * n * row_dtype.itemsize // 8) * 8  # the scratch after it starts 8-byte aligned
        scratch_bytes = (t + 1) * columns * 8 if on_cpu else 0
        arena = self.buffer("arena", (row_bytes + scratch_bytes,), torch.uint8, torch.device("cpu"))
        rows = arena[:n_rows * n * row_dtype.itemsize].view(row_dtype).view(n_rows, n)
        if self.holds_deltas:
            base_raw = self.buffer("base-raw", (n,), spec.dtype, torch.device("cpu"))
            base = self._read_into(self.base, name, r0, r1, base_raw)
            base64 = base.to(torch.float64)
            raw = self.buffer("raw", (n * spec.dtype.itemsize,), torch.uint8, torch.device("cpu"))
            for i, reader in enumerate(self.readers):
                reader.read_delta(name, r0, r1, base=base64, out=rows[i], buffer=raw)
        else:
            readers = [self.base, *self.readers]
            list(self._pool.map(lambda i: self._read_into(readers[i], name, r0, r1, rows[i]), range(t + 1)))
            base = rows[0]
        if on_cpu:
            scratch = arena[row_bytes:].view(torch.float64).view(t + 1, columns)
        else:
            rows = self.buffer("rows-device", rows.shape, rows.dtype).copy_(rows)
            base = self.buffer("base-device", base.shape, base.dtype).copy_(base)
            scratch = self.buffer("scratch", (t + 1, columns))
        return Block(rows, self.holds_deltas, base, self.device, scratch)

    @staticmethod
    def _read_into(reader, name: str, r0: int, r1: int, dest: torch.Tensor) -> torch.Tensor:
        """Rows r0:r1 of ``name`` from one checkpoint into flat ``dest`` (its stored dtype)."""
        value = reader.read(name, r0, r1, dest.view(torch.uint8)).reshape(-1)
        if value.data_ptr() != dest.data_ptr():  # a pickle checkpoint's tensor is not read into the buffer
            dest.copy_(value)
        return dest

    def stats(self, name: str, spec: TensorSpec, block: Block | None = None) -> TensorStats:
        """Gram statistics of a tensor: from a block already read (the whole tensor), or block by block."""
        if block is not None:
            gram = block.gram()
        else:
            gram = sum(self.load(name, r0, r1).gram() for r0, r1 in self.blocks(spec))
        return self.checked_stats(name, spec, gram.numpy())

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

    def deltas(self, name: str) -> ReadDeltas:
        """One tensor's deltas in row blocks within the budget (for methods that are not weighted sums)."""
        return self.trajectory.deltas(name, max(self.budget - FIXED_OVERHEAD, 0), self._buffers)

    def outputs(self, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        """One reused flat output buffer of ``dtype`` per target, on the CPU where the writers take it."""
        return [self.buffer(f"out{j}-{dtype}", (numel,), dtype, torch.device("cpu"))
                for j in range(max(self.n_outputs, 1))]

    def cast(self, values: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """``values`` rounded once to the output dtype in a reused buffer (no allocation per tensor)."""
        out = self.buffer(f"out-{dtype}", (values.numel(),), dtype)
        return cast_into(out, values.reshape(-1)).view(shape)
