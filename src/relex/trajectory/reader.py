"""Lazy, per-tensor access to one model folder's weights (safetensors, sharded or not; pickle on request).

Nothing is loaded up front: headers are parsed, and a tensor (or a block of its rows) is read from the
memory-mapped file only when asked for, so memory never scales with the size of a checkpoint.
"""

from __future__ import annotations

import json
import logging
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


class CheckpointReader:
    """Tensor names, specs and row-block reads for one model folder."""

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder, allow_pickle)
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        self.specs: dict[str, TensorSpec] = {}
        for file in self.files:
            for name, spec in self._scan(file).items():
                if name in self._where:
                    raise RelexError(f"{file}: tensor '{name}' also stored in {self._where[name]}")
                self._where[name] = file
                self.specs[name] = spec

    def _scan(self, file: Path) -> dict[str, TensorSpec]:
        if file.suffix == ".bin":
            state = self._open(file)
            return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
        handle = self._open(file)
        specs = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise RelexError(f"{file}: tensor '{name}' has unsupported dtype {sl.get_dtype()}")
            specs[name] = TensorSpec(tuple(sl.get_shape()), dtype)
        return specs

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise RelexError(f"{file}: weight file listed in the index is missing")
            try:
                if file.suffix == ".bin":
                    log.warning("loading pickle checkpoint %s with weights_only=True", file)
                    self._handles[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                else:
                    self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
                raise RelexError(f"{file}: corrupt or truncated weight file ({exc})") from None
        return self._handles[file]

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` in its stored dtype (the whole tensor by default)."""
        file = self._where[name]
        handle = self._open(file)
        try:
            if file.suffix == ".bin":
                tensor = handle[name]
                return tensor if tensor.dim() == 0 else tensor[start:stop]
            sl = handle.get_slice(name)
            if not sl.get_shape():
                return handle.get_tensor(name)
            return sl[start:stop]
        except SafetensorError as exc:
            raise RelexError(f"{file}: cannot read tensor '{name}' ({exc})") from None

    def fingerprint(self) -> list[list]:
        """(file, size, mtime) of each weight file: tells a stale statistics cache from a valid one."""
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
