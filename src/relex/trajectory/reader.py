"""Lazy, per-tensor access to one model folder's weights (safetensors, sharded or not; pickle on request).

Nothing is loaded up front: headers are parsed (and each file validated by safetensors' own
``safe_open``), and a tensor or a block of its rows is read only when asked for, with ``preadv`` into a
caller's reusable buffer. Plain reads run at ``cat`` speed, where first touches of memory-mapped pages
cost a page fault each (expensive in VMs) and count toward the process's resident memory.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from relex.errors import RelexError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PEFT_WEIGHT_FILES = {"adapter_model.safetensors", "adapter_model.bin"}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and stored dtype of one tensor, as its header declares them."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        """Length of the first axis: the unit in which big tensors are read block by block."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return self.numel // self.rows if self.rows else 0


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The files that hold a model folder's weights, in shard order; refuses pickle unless allowed."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(p for p in folder.glob("*.safetensors") if p.name not in PEFT_WEIGHT_FILES)
    if shards:
        return shards
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise RelexError(
                f"{pickles[0]}: pickle checkpoint refused (it can run code); "
                "convert it to safetensors or pass --allow-pickle to load it with weights_only=True")
        return pickles
    raise RelexError(f"{folder}: no model weights found (expected model.safetensors or shards)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RelexError(f"{path}: cannot read JSON ({exc})") from None


@dataclass(frozen=True)
class _Location:
    """Where a tensor's bytes are: file and absolute byte offset of its first element."""

    file: Path
    offset: int


class CheckpointReader:
    """Tensor names, specs and row-block reads for one model folder."""

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self._fds: dict[Path, int] = {}
        self.folder = Path(folder)
        self.files = weight_files(self.folder, allow_pickle)
        self._pickles: dict[Path, dict] = {}
        self._where: dict[str, _Location] = {}
        self.specs: dict[str, TensorSpec] = {}
        for file in self.files:
            scan = self._scan_pickle(file) if file.suffix == ".bin" else self._scan_safetensors(file)
            for name, (spec, offset) in scan.items():
                if name in self._where:
                    raise RelexError(f"{file}: tensor '{name}' also stored in {self._where[name].file}")
                self._where[name] = _Location(file, offset)
                self.specs[name] = spec

    def _scan_safetensors(self, file: Path) -> dict[str, tuple[TensorSpec, int]]:
        if not file.is_file():
            raise RelexError(f"{file}: weight file listed in the index is missing")
        try:
            with safe_open(str(file), framework="pt"):  # safetensors' own validation of the whole file
                pass
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (SafetensorError, OSError, ValueError, struct.error) as exc:
            raise RelexError(f"{file}: corrupt or truncated weight file ({exc})") from None
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise RelexError(f"{file}: tensor '{name}' has unsupported dtype {entry['dtype']}")
            out[name] = (TensorSpec(tuple(entry["shape"]), dtype), 8 + length + entry["data_offsets"][0])
        return out

    def _scan_pickle(self, file: Path) -> dict[str, tuple[TensorSpec, int]]:
        log.warning("loading pickle checkpoint %s with weights_only=True", file)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise RelexError(f"{file}: corrupt or truncated weight file ({exc})") from None
        self._pickles[file] = state
        return {k: (TensorSpec(tuple(v.shape), v.dtype), 0) for k, v in state.items()}

    def file_of(self, name: str) -> Path:
        return self._where[name].file

    def read(self, name: str, start: int = 0, stop: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` in its stored dtype (the whole tensor by default).

        With ``buffer`` (uint8, large enough) the bytes land there and the result is a view of it.
        """
        where, spec = self._where[name], self.specs[name]
        stop = spec.rows if stop is None else min(stop, spec.rows)
        if where.file in self._pickles:
            tensor = self._pickles[where.file][name]
            return tensor if tensor.dim() == 0 else tensor[start:stop]
        row_bytes = spec.row_numel * spec.dtype.itemsize
        count = max(stop - start, 0) * row_bytes
        raw = buffer[:count] if buffer is not None else torch.empty(count, dtype=torch.uint8)
        if count and os.preadv(self._fd(where.file), [raw.numpy()], where.offset + start * row_bytes) != count:
            raise RelexError(f"{where.file}: tensor '{name}' is truncated")
        shape = spec.shape and (stop - start,) + spec.shape[1:]
        return raw.view(spec.dtype).reshape(shape)

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def fingerprint(self) -> list[list]:
        """(file, size, mtime) of each weight file: tells a stale statistics cache from a valid one."""
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
