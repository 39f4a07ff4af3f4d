"""Read one tensor's rows from every observed checkpoint, in row blocks that fit a memory budget.

A block keeps the rows as stored (bf16, fp16 or fp32 bytes). Each pass over it (the Gram matrix, then the
weighted sums) makes the float64 deltas W_t - W_0 a cache-sized chunk of columns at a time, one chunk per
core side by side, and uses them before they leave the cache: converting twice this way is faster than
keeping a float64 stack in memory, and a block costs its stored bytes, not 8 bytes a value. Upcasting to
float64 is exact and so is the subtraction: the deltas are the stored values' exact differences, and the
Gram matrix and weighted sums are reduced in float64, chunk results combined in column order whatever the
thread count. On a CPU both passes are fused numba kernels where numba is installed (``kernels``: convert,
subtract and reduce in one pass over a cache-resident tile, the same bytes out), torch's otherwise or with
``RELEX_KERNELS=torch``. A LoRA checkpoint's delta (B @ A * scale, ``read_delta``) is float64 already and is
kept as such, never a rounded W_0 + delta minus W_0. Buffers are reused (no per-tensor allocation), so memory stays
at the budget whatever the model size. ``delta_dtype="float16"`` makes the deltas as the RELEX reference code does
(W_t and W_0 rounded to fp16, subtracted in fp16; an adapter's W_t is W_0 + B @ A * scale), then float64 from there
on, for comparison with published numbers: torch's path only (the fused kernels make exact deltas)."""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.materialize.rounding import cast_into, round_once
from relex.stats.gram import TensorStats, gram_of
from relex.trajectory import BufferPool, ReadDeltas, TensorSpec, Trajectory

CHUNK_BYTES = 2 << 20      # float64 bytes of one chunk of deltas (T+1 x columns): it stays in cache between its
                           # conversion and its products (measured: 1.3-1.9x faster than one float64 stack)
KERNELS_ENV = "RELEX_KERNELS"  # "torch" takes torch's kernels where the fused ones would run (tests, benchmarks)
DELTA_DTYPES = {"float64": torch.float64, "float16": torch.float16}  # float64: exact; float16: the reference's

R = TypeVar("R")


def _single_threaded_ops() -> None:
    """Run torch's kernels in this worker thread on this thread alone: the workers are one per core already, and
    each one's OpenMP team of torch's thread count put 4 threads on 2 cores (measured on a 0.5B bf16 run: 170K
    involuntary context switches, down to 2.5K, and 17.1 -> 15.6 s). OpenMP's thread count is per thread: only the
    pool's threads change, after torch's first kernel here has set its own (it would reset ours). Where the process
    has no OpenMP runtime to find (other torch builds, other systems), nothing changes."""
    torch.zeros(2).add_(1)
    try:
        set_threads = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    except (OSError, TypeError):  # no handle on the process's own symbols (Windows)
        return
    if set_threads is not None:
        set_threads(1)


def fused_kernels() -> ModuleType | None:
    """The fused CPU kernels (materialize/kernels.py), or None where numba is not installed or
    ``RELEX_KERNELS=torch``. Imported on first use: a command that computes nothing does not pay numba's import."""
    if os.environ.get(KERNELS_ENV, "").strip().lower() == "torch":
        return None
    try:
        from relex.materialize import kernels
    except ImportError:
        return None
    return kernels


def all_finite(values: torch.Tensor) -> bool:
    """Whether no entry is NaN or Inf: one pass (NaN propagates through min and max) and no temporary the size
    of ``values``, where ``isfinite(values).all()`` allocated one that the allocator kept (measured: +280 MB)."""
    if values.numel() == 0:
        return True
    return all(math.isfinite(float(v)) for v in torch.aminmax(values.reshape(-1)))


def _chunk_columns(n_steps: int) -> int:
    """Columns of one cache-sized chunk of float64 deltas and base (n_steps + 1 rows of CHUNK_BYTES)."""
    return max(1, CHUNK_BYTES // (8 * (n_steps + 1)))


def _round_deltas_float16(work: torch.Tensor) -> None:
    """Replace the exact deltas ``work[1:]`` (W_0 in ``work[0]``) by the RELEX reference code's: fp16(W_t) - fp16(W_0),
    subtracted in fp16, with W_t = W_0 + delta (its stored value: the deltas are exact) correctly rounded to fp16;
    a cache-sized run of columns at a time, so the temporaries stay small whatever the block."""
    width = _chunk_columns(work.shape[0] - 1)
    for c0 in range(0, work.shape[1], width):
        chunk = work[:, c0:c0 + width]
        weights = round_once(chunk[1:] + chunk[0], torch.float16)
        chunk[1:].copy_(weights.sub_(round_once(chunk[0], torch.float16)))


class Block:
    """Rows r0:r1 of one tensor in the base and every observed checkpoint, with float64 deltas by chunk.

    ``rows`` holds the checkpoints' stored values ((T+1) x n, base first) when every checkpoint stores its
    weights, or their float64 deltas (T x n) when some are adapters (``holds_deltas``). The float64 deltas
    are made in ``scratches``: one buffer per worker thread, each a cache-sized chunk of columns at a time
    (converted again by every pass: cheaper than a float64 stack in memory), or a single buffer that holds
    the whole block (converted once: on a GPU, and for methods that need the whole stack). Given ``kernels``
    (``fused_kernels()``), stored rows of a dtype they read skip the scratches: each pass is one fused kernel.
    ``delta_dtype`` float16: each delta is fp16(W_t) - fp16(W_0) in fp16 (the reference's), then float64.
    """

    def __init__(self, rows: torch.Tensor, holds_deltas: bool, base: torch.Tensor, device: torch.device,
                 scratches: list[torch.Tensor], pool: ThreadPoolExecutor | None = None,
                 kernels: ModuleType | None = None, delta_dtype: torch.dtype = torch.float64) -> None:
        self.rows, self.holds_deltas, self.base, self.device = rows, holds_deltas, base, device
        self.delta_dtype = delta_dtype
        covered = (kernels is not None and not holds_deltas and device.type == "cpu" and rows.is_contiguous()
                   and rows.dtype in kernels.STORED_DTYPES and delta_dtype == torch.float64)
        self.kernels = kernels if covered else None
        self.n_steps = rows.shape[0] - (0 if holds_deltas else 1)
        self.numel = rows.shape[1]
        self.scratches, self.pool = scratches, pool
        chunk = scratches[0].shape[1]
        self.spans = [(c0, min(c0 + chunk, self.numel)) for c0 in range(0, max(self.numel, 1), chunk)]  # (0, 0) if empty
        self._converted = False  # the whole block is in its one scratch already: later passes skip the conversion

    def _deltas(self, scratch: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(deltas T x c, base c) of columns c0:c1, float64 on the block's device, made in ``scratch``."""
        work = scratch[:, :c1 - c0]
        if not self._converted:
            if self.holds_deltas:
                work[0].copy_(self.base[c0:c1])
                work[1:].copy_(self.rows[:, c0:c1])
            else:
                work.copy_(self.rows[:, c0:c1])
                work[1:].sub_(work[0])
            if self.delta_dtype == torch.float16:
                _round_deltas_float16(work)
        return work[1:], work[0]

    def map_spans(self, fn: Callable[[int, int, int], R]) -> list[R]:
        """``fn(worker, c0, c1)`` of every span of columns, in column order; the worker threads (one per scratch)
        take contiguous runs of spans, so each result is the same whatever the thread count."""
        workers = min(len(self.scratches), len(self.spans))
        cuts = [len(self.spans) * i // workers for i in range(workers + 1)]

        def run(i: int) -> list[R]:
            return [fn(i, c0, c1) for c0, c1 in self.spans[cuts[i]:cuts[i + 1]]]

        runs = list(self.pool.map(run, range(workers))) if workers > 1 else [run(0)]
        return [result for part in runs for result in part]

    def map_chunks(self, fn: Callable[[int, torch.Tensor, torch.Tensor], R]) -> list[R]:
        """``fn(first column, deltas, base)`` of every chunk, in column order (``map_spans``)."""
        results = self.map_spans(lambda i, c0, c1: fn(c0, *self._deltas(self.scratches[i], c0, c1)))
        self._converted = len(self.spans) == 1
        return results

    def gram(self) -> torch.Tensor:
        """G = M M^T of the block's deltas (T x T, float64, on the CPU), the chunks' Grams summed in order."""
        if self.kernels is not None:
            rows, gram_span = self.kernels.raw(self.rows), self.kernels.gram_span
            total = np.zeros((self.n_steps, self.n_steps))
            for part in self.map_spans(lambda _, c0, c1: gram_span(rows, c0, c1)):
                total += part
            return torch.from_numpy(total)
        gram = torch.zeros(self.n_steps, self.n_steps, dtype=torch.float64, device=self.device)
        # a stacked block's Gram by cache-sized column chunks too: on a CPU, one matmul over an 8 x 4M stack
        # takes 2x as long (0.21 vs 0.10 s on one core); a GPU takes the whole block in one
        width = _chunk_columns(self.n_steps) if self.device.type == "cpu" else max(self.numel, 1)

        def chunk_gram(_: int, deltas: torch.Tensor, __: torch.Tensor) -> torch.Tensor:
            part = gram_of(deltas[:, :width])
            for c0 in range(width, deltas.shape[1], width):
                part += gram_of(deltas[:, c0:c0 + width])
            return part

        for part in self.map_chunks(chunk_gram):
            gram += part
        return gram.cpu()

    def weighted_sums(self, weights: np.ndarray, outs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Fill flat ``outs[j]`` with W_0 + sum_t weights[j, t] Delta_t, reduced in float64 and rounded once
        to its dtype."""
        weights = np.ascontiguousarray(weights, dtype=np.float64)
        if self.kernels is not None and all(out.device.type == "cpu" and out.dim() == 1 and out.is_contiguous()
                                            and out.dtype in self.kernels.OUTPUT_DTYPES for out in outs):
            rows, sums_span = self.kernels.raw(self.rows), self.kernels.sums_span
            raw_outs = [self.kernels.raw(out) for out in outs]

            def fused(_: int, c0: int, c1: int) -> None:
                for row, out in zip(weights, raw_outs):
                    sums_span(rows, row, out, c0, c1)

            self.map_spans(fused)
            return outs
        w = torch.from_numpy(weights).to(self.device)

        def fill(c0: int, deltas: torch.Tensor, base: torch.Tensor) -> None:
            part = torch.mm(w, deltas).add_(base)
            for j, out in enumerate(outs):
                cast_into(out[c0:c0 + deltas.shape[1]], part[j])

        self.map_chunks(fill)
        return outs

    def stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every delta, T x n, and the base, n) in float64, for a block loaded ``stacked``."""
        [(deltas, base)] = self.map_chunks(lambda _, deltas, base: (deltas, base))
        return deltas, base


class DeltaStream:
    """Block planning and block reads for the tensors of an observed trajectory."""

    def __init__(self, trajectory: Trajectory, memory_budget: MemoryBudget | str | int, device: str = "cpu",
                 n_outputs: int = 0, delta_dtype: str = "float64") -> None:
        if delta_dtype not in DELTA_DTYPES:
            raise RelexError(f"--delta-dtype {delta_dtype}: choose one of {', '.join(DELTA_DTYPES)}")
        self.trajectory = trajectory
        self.base = trajectory.reader(trajectory.base)
        self.readers = [trajectory.reader(c.path) for c in trajectory.checkpoints]
        self.steps = np.array(trajectory.steps, dtype=np.float64)
        self.budget = MemoryBudget.of(memory_budget)
        self.n_outputs = n_outputs  # targets written per tensor: their values share the budget with the rows
        self.device = torch.device(device)
        self.holds_deltas = not all(r.stores_weights for r in self.readers)
        self.delta_dtype = delta_dtype
        self._buffers = BufferPool(self.device)
        # the CPU buffers ``load`` reads a block's rows into, and those of a direct method's row blocks (``deltas``):
        # each set takes up to the whole budget, so each reader lets the other's go first
        self._load_buffers, self._deltas_buffers = self._buffers.scope("load"), self._buffers.scope("deltas")
        # files are read, and chunks computed, side by side (both release the GIL): a thread per core
        self.workers = max(1, torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="relex", initializer=_single_threaded_ops)

    def bytes_per_element(self, spec: TensorSpec, stacked: bool = False) -> int:
        """Live bytes per tensor element: the stored rows (float64 deltas for adapters) and the outputs, plus a
        float64 stack of every delta and the base when ``stacked`` (methods that are not weighted sums)."""
        t = len(self.readers)
        # adapters: the base as stored and in float64, and each checkpoint's float64 delta
        rows = spec.dtype.itemsize + (8 + 8 * t if self.holds_deltas else spec.dtype.itemsize * t)
        device_copy = rows if self.device.type != "cpu" else 0  # the rows again on the device
        return rows + device_copy + self.n_outputs * 8 + (8 * (t + 1) if stacked else 0)

    def row_ranges(self, spec: TensorSpec, stacked: bool = False) -> list[tuple[int, int]]:
        """Row ranges whose rows fit the budget (one range when the whole tensor fits)."""
        per_row = self.bytes_per_element(spec, stacked) * max(spec.row_numel, 1)
        rows_per_block = max(1, self.budget.rows // per_row)
        return [(r0, min(r0 + rows_per_block, spec.rows)) for r0 in range(0, spec.rows, rows_per_block)] or [(0, 0)]

    def fits_stacked(self, spec: TensorSpec) -> bool:
        """Whether the whole tensor's float64 stack fits the budget beside its rows (one block, converted once)."""
        return len(self.row_ranges(spec, stacked=True)) == 1

    def buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
               device: torch.device | None = None) -> torch.Tensor:
        """A view of a reused buffer that only ever grows: no allocation or page faults per tensor."""
        return self._buffers.get(key, shape, dtype, device)

    def load(self, name: str, r0: int, r1: int, stacked: bool = False) -> Block:
        """Rows r0:r1 of tensor ``name`` from the base and every observed checkpoint, read once; ``stacked``
        (the block's float64 stack fits the budget, ``fits_stacked``) keeps the whole stack for ``Block.stack``.

        The rows and the float64 scratch share one buffer, so the largest block sets the memory, not the
        largest rows of one tensor plus the largest scratch of another.
        """
        spec = self.base.specs[name]
        if not 0 <= r0 <= r1 <= spec.rows:  # a caller's bug: past the tensor the buffer holds whatever was there
            raise ValueError(f"rows {r0}:{r1} of '{name}', which has {spec.rows}")
        n = (r1 - r0) * spec.row_numel
        t = len(self.readers)
        on_cpu = self.device.type == "cpu"
        whole = stacked or not on_cpu  # converted once, kept for both passes
        columns = max(1, min(n if whole else _chunk_columns(t), n))
        workers = 1 if whole else self.workers
        row_dtype, n_rows = (torch.float64, t) if self.holds_deltas else (spec.dtype, t + 1)
        row_bytes = -(-n_rows * n * row_dtype.itemsize // 8) * 8  # the scratch after it starts 8-byte aligned
        scratch_bytes = workers * (t + 1) * columns * 8 if on_cpu else 0
        self._deltas_buffers.release()  # a direct method's row blocks (``deltas``) are done with
        arena = self._load_buffers.get("arena", (row_bytes + scratch_bytes,), torch.uint8, torch.device("cpu"))
        rows = arena[:n_rows * n * row_dtype.itemsize].view(row_dtype).view(n_rows, n)
        if self.holds_deltas:
            base_raw = self._load_buffers.get("base-raw", (n,), spec.dtype, torch.device("cpu"))
            base = self._read_into(self.base, name, r0, r1, base_raw)
            base64 = self._load_buffers.get("base64", (n,), torch.float64, torch.device("cpu")).copy_(base)
            raw = self._load_buffers.get("raw", (n * spec.dtype.itemsize,), torch.uint8, torch.device("cpu"))
            for i, reader in enumerate(self.readers):
                reader.read_delta(name, r0, r1, base=base64, out=rows[i], buffer=raw)
        else:
            readers = [self.base, *self.readers]
            list(self._pool.map(lambda i: self._read_into(readers[i], name, r0, r1, rows[i]), range(t + 1)))
            base = rows[0]
        if on_cpu:
            scratches = list(arena[row_bytes:].view(torch.float64).view(workers, t + 1, columns))
        else:
            rows = self.buffer("rows-device", rows.shape, rows.dtype).copy_(rows)
            base = self.buffer("base-device", base.shape, base.dtype).copy_(base)
            scratches = [self.buffer("scratch", (t + 1, columns))]
        return Block(rows, self.holds_deltas, base, self.device, scratches, self._pool,
                     None if whole else fused_kernels(), DELTA_DTYPES[self.delta_dtype])

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
            gram = sum(self.load(name, r0, r1).gram() for r0, r1 in self.row_ranges(spec))
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
        base_bad = any(not all_finite(self.base.read(name, r0, r1)) for r0, r1 in self.row_ranges(spec))
        culprit = self.base if base_bad else self.readers[int(np.flatnonzero(bad)[0])]
        if self.delta_dtype == "float16" and all(all_finite(culprit.read(name, r0, r1))
                                                 for r0, r1 in self.row_ranges(spec)):
            raise RelexError(f"{culprit.file_of(name)}: tensor '{name}' overflows float16 (beyond 65504) under "
                             "--delta-dtype float16; use the default float64")
        raise RelexError(f"{culprit.file_of(name)}: tensor '{name}' contains NaN or Inf")

    def deltas(self, name: str) -> ReadDeltas:
        """One tensor's deltas in row blocks within the budget (for methods that are not weighted sums). Their
        buffers take up to the whole budget, so ``load``'s rows are let go first, and theirs by the next ``load``:
        the two were held at once (measured: 2.3 GB of own memory at a 2 GB budget)."""
        self._load_buffers.release()
        return self.trajectory.deltas(name, self.budget.rows, self._deltas_buffers)

    def outputs(self, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        """One reused flat output buffer of ``dtype`` per target, on the CPU where the writers take it."""
        return [self.buffer(f"out{j}-{dtype}", (numel,), dtype, torch.device("cpu"))
                for j in range(max(self.n_outputs, 1))]

    def cast(self, values: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """``values`` rounded once to the output dtype in a reused buffer (no allocation per tensor)."""
        out = self.buffer(f"out-{dtype}", (values.numel(),), dtype)
        return cast_into(out, values.reshape(-1)).view(shape)
