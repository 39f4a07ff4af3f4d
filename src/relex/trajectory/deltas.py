"""One tensor's deltas W_t - W_0, visited in row blocks, for methods that are not weighted sums (AlphaRL, NExt).

The tensor is viewed as a rows x row_numel matrix (a 1-D tensor: n rows of one element). ``blocks`` yields
its rows a block at a time, with the base's rows and the deltas of the checkpoints asked for, so a method
computes matrix products (``relex.methods.rowblocks``) in memory bounded by the block, not the tensor.
``StackedDeltas`` holds a stack already read (one block: the tensor fits the budget); ``ReadDeltas`` reads
the blocks from the checkpoint files at every visit. ``factors`` gives a LoRA checkpoint's delta as its two
factors, whose products methods need never form.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from relex.trajectory.peft import AdapterReader
from relex.trajectory.reader import CheckpointReader


Factors = tuple[torch.Tensor, torch.Tensor]  # (left, right): a delta as their product, rows x r times r x row_numel


class BufferPool:
    """Reused buffers by key that only ever grow: no allocation or page faults per tensor or per block.

    A ``scope`` is a view of the same pool with keys of its own: a reader lets go of another reader's buffers
    (two sets that each fill the budget must not be held at once) by releasing its scope, not by naming its keys.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._prefix = ""  # a scope's keys: "name/" (the whole pool: "")

    def scope(self, name: str) -> BufferPool:
        """A view of this pool whose keys are its own (stored as ``name/key``), released together."""
        view = copy.copy(self)  # the same buffers
        view._prefix = f"{self._prefix}{name}/"
        return view

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
            device: torch.device | None = None) -> torch.Tensor:
        """A view of shape ``shape`` of buffer ``key`` (valid until the next ``get`` of that key)."""
        key = self._prefix + key
        numel = 1
        for d in shape:
            numel *= d
        have = self._buffers.get(key)
        if have is None or have.numel() < numel or have.dtype != dtype:
            self._buffers.pop(key, None)
            have = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device or self.device)
        return have[:numel].view(shape)

    def release(self) -> None:
        """Let go of every buffer of this scope (of the whole pool, scopes included, at its root)."""
        for key in [k for k in self._buffers if k.startswith(self._prefix)]:
            del self._buffers[key]


@dataclass(frozen=True)
class RowBlock:
    """Rows ``start:stop`` of a tensor: the base's (float64, flat) and the deltas asked for (each a
    (stop - start) x row_numel float64 view, valid until the next block is read)."""

    start: int
    stop: int
    base: torch.Tensor
    deltas: list[torch.Tensor]


class TensorDeltas(ABC):
    """The observed deltas of one tensor of shape ``tensor_shape``, as matrices ``shape`` = (rows, row_numel)
    on ``device``; ``len``: how many checkpoints."""

    def __init__(self, tensor_shape: tuple[int, ...], count: int, device: torch.device) -> None:
        self.tensor_shape, self.count, self.device = tuple(tensor_shape), count, device
        rows = tensor_shape[0] if tensor_shape else 1
        numel = 1
        for d in tensor_shape:
            numel *= d
        self.shape = (rows, numel // rows if rows else 0)

    def __len__(self) -> int:
        return self.count

    @abstractmethod
    def blocks(self, checkpoints: Sequence[int]) -> Iterator[RowBlock]:
        """Every row block in order, with the deltas of ``checkpoints`` (indices into the observed ones)."""

    def factors(self, checkpoint: int) -> Factors | None:
        """(left, right) with left @ right = one checkpoint's delta (rows x row_numel), when its file stores it
        as factors (a LoRA adapter's); None otherwise."""
        return None

    def whole(self, checkpoint: int) -> torch.Tensor:
        """One checkpoint's whole delta as a rows x row_numel float64 tensor (for tensors known to be small)."""
        whole = torch.empty(self.shape, dtype=torch.float64, device=self.device)
        for block in self.blocks([checkpoint]):  # each block's views are overwritten by the next: copy as they come
            whole[block.start:block.stop] = block.deltas[0]
        return whole


class StackedDeltas(TensorDeltas):
    """Deltas already in memory: a T x numel float64 stack and the base (numel, float64), one block; the
    ``factors`` of the same deltas are ``source``'s (the files' ``ReadDeltas``) when given."""

    def __init__(self, stack: torch.Tensor, base: torch.Tensor, tensor_shape: tuple[int, ...],
                 source: TensorDeltas | None = None) -> None:
        super().__init__(tensor_shape, stack.shape[0], stack.device)
        self.stack, self.base, self.source = stack, base, source

    def factors(self, checkpoint: int) -> Factors | None:
        return self.source.factors(checkpoint) if self.source is not None else None

    def blocks(self, checkpoints: Sequence[int]) -> Iterator[RowBlock]:
        yield RowBlock(0, self.shape[0], self.base, [self.stack[t].view(self.shape) for t in checkpoints])


class ReadDeltas(TensorDeltas):
    """Deltas read from the files block by block, at most ``block_bytes`` live per visit.

    A visit reads the base's rows and each asked-for checkpoint's (``read_delta``: exact float64 deltas, a
    LoRA checkpoint's from its factors) into ``buffers`` (the streaming engine's: a scope of its pool, let go
    before it reads a stack of rows); the buffers are reused across blocks and visits.
    """

    def __init__(self, base: CheckpointReader, readers: Sequence[CheckpointReader | AdapterReader], name: str,
                 block_bytes: int, buffers: BufferPool) -> None:
        spec = base.specs[name]
        super().__init__(spec.shape, len(readers), buffers.device)
        self.base_reader, self.readers, self.name = base, readers, name
        self.block_bytes, self.itemsize, self.buffers = block_bytes, spec.dtype.itemsize, buffers
        self._factors: dict[int, Factors | None] = {}  # read once per checkpoint: r x (rows + row_numel) values

    def factors(self, checkpoint: int) -> Factors | None:
        if checkpoint not in self._factors:
            self._factors[checkpoint] = self.readers[checkpoint].delta_factors(self.name)
        return self._factors[checkpoint]

    def rows_per_block(self, width: int) -> int:
        """Rows that fit ``block_bytes`` (at least one): per element, the raw bytes, the float64 base and
        ``width`` deltas, and room for the caller's work on a block: two float64 temporaries (a difference of
        deltas, a predicted block) and an output of up to 4 bytes."""
        per_row = max(self.shape[1], 1) * (self.itemsize + 4 + 8 * (3 + width))
        return max(1, self.block_bytes // per_row)

    def stacked(self) -> TensorDeltas:
        """Every checkpoint's delta read once into one float64 stack (``StackedDeltas``) when it fits
        ``block_bytes``, for methods that visit the rows many times (a read per visit costs more than the
        arithmetic); these row-block reads otherwise, and when every delta has ``factors`` (nothing to visit).
        The stack is the pool's: valid until its next block."""
        if self.shape[0] == 0 or self.rows_per_block(self.count) < self.shape[0]:
            return self
        if all(self.factors(t) is not None for t in range(self.count)):
            return self
        [block] = self.blocks(range(self.count))
        stack = self.buffers.get("stack", (self.count, block.base.numel()))
        return StackedDeltas(stack, block.base, self.tensor_shape, source=self)

    def blocks(self, checkpoints: Sequence[int]) -> Iterator[RowBlock]:
        rows, width = self.shape
        step = self.rows_per_block(len(checkpoints))
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            numel = (r1 - r0) * width
            raw = self.buffers.get("raw", (numel * self.itemsize,), torch.uint8, torch.device("cpu"))
            base = self.buffers.get("base", (numel,))
            base.copy_(self.base_reader.read(self.name, r0, r1, raw).reshape(-1))
            stack = self.buffers.get("stack", (len(checkpoints), numel))
            for i, t in enumerate(checkpoints):
                self.readers[t].read_delta(self.name, r0, r1, base=base, out=stack[i], buffer=raw)
            yield RowBlock(r0, r1, base, [stack[i].view(r1 - r0, width) for i in range(len(checkpoints))])
