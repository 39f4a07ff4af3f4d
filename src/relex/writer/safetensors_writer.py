"""A streaming, sharded safetensors writer whose memory does not grow with the model.

The shard layout is planned up front from names, shapes and dtypes, so each shard's header (with
every offset) is written first and tensor bytes then go straight to disk, block by block, in layout
order. The files are ordinary safetensors that ``safe_open``, transformers and vLLM read.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy shards of at most ``max_shard_size`` bytes (a bigger tensor gets a shard of its own).

    Within a shard, tensors are laid out by decreasing item size, as safetensors does, so every
    tensor's data stays aligned to its dtype.
    """
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [sorted(s, key=lambda t: -t.dtype.itemsize) for s in shards]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(shard: list[PlannedTensor]) -> bytes:
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        entries[tensor.name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Write planned tensors, in plan order, as row blocks; the index is written on ``close``."""

    def __init__(self, folder: Path, shards: list[list[PlannedTensor]], label: Path | None = None) -> None:
        self.folder = Path(folder)
        self.label = Path(label) if label is not None else self.folder  # the name errors give (the final folder)
        self.shards = shards
        self.names = shard_names(len(shards))
        self.order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._position = 0  # index into self.order of the tensor being written
        self._written = 0   # bytes of that tensor written so far
        self._file = None
        self._shard = -1

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append ``block`` (a run of leading rows) to tensor ``name``, which must be the next in order."""
        shard, tensor = self.order[self._position]
        if name != tensor.name or block.dtype != tensor.dtype:
            raise RuntimeError(f"writer expected {tensor.name} ({tensor.dtype}), got {name} ({block.dtype})")
        data = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            if shard != self._shard:
                self._open_shard(shard)
            self._file.write(memoryview(data))
        except OSError as exc:
            raise RelexError(f"{self.label / self.names[shard]}: cannot write tensor '{name}' "
                             f"({exc.strerror or exc})") from None
        self._written += data.nbytes
        if self._written > tensor.nbytes:
            raise RuntimeError(f"writer got more bytes than planned for {name}")
        if self._written == tensor.nbytes:
            self._position += 1
            self._written = 0

    def _open_shard(self, shard: int) -> None:
        self._finish_shard()
        self._shard = shard
        self._file = open(self.folder / self.names[shard], "wb")
        self._file.write(_header(self.shards[shard]))

    def _finish_shard(self) -> None:
        """Close the open shard once its bytes are on disk (fsync: a published folder survives a crash)."""
        if self._file:
            file, self._file = self._file, None
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()

    def close(self) -> None:
        """Finish the last shard and write the index when there is more than one shard."""
        try:
            self._finish_shard()
        except OSError as exc:
            raise RelexError(f"{self.label / self.names[self._shard]}: cannot write ({exc.strerror or exc})") from None
        if self._position != len(self.order):
            raise RelexError(f"{self.folder}: output incomplete ({self._position}/{len(self.order)} tensors)")
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[i] for i, t in self.order}
            total = sum(t.nbytes for _, t in self.order)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            try:
                (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise RelexError(f"{self.label / INDEX_NAME}: cannot write ({exc.strerror or exc})") from None

    def abort(self) -> None:
        if self._file:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
