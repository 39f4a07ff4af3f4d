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
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from relex.errors import RelexError
from relex.safeio import inside, read_json_object, regular_file

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFE_WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    """The files that hold a model folder's weights, in shard order, chosen as transformers 5 does.

    Precedence (``modeling_utils._get_resolved_checkpoint_files``): model.safetensors, then
    model.safetensors.index.json, then pytorch_model.bin, then pytorch_model.bin.index.json; a stale
    index or old shards beside a model.safetensors are ignored, as transformers ignores them.
    Pickles are refused unless allowed. Any of these names that is not a regular file (a FIFO, a folder, a link
    to a device) is refused as such, never opened.
    """
    single = folder / SAFE_WEIGHTS
    if regular_file(single):
        return [single]
    index = folder / f"{SAFE_WEIGHTS}.index.json"
    if regular_file(index):
        return _indexed(index)
    pickles = [p for p in (folder / PICKLE_WEIGHTS, folder / f"{PICKLE_WEIGHTS}.index.json") if regular_file(p)]
    if pickles:
        if not allow_pickle:
            raise RelexError(
                f"{pickles[0]}: pickle checkpoint refused (it can run code); "
                "convert it to safetensors or pass --allow-pickle to load it with weights_only=True")
        return [pickles[0]] if pickles[0].suffix == ".bin" else _indexed(pickles[0])
    if (folder / ADAPTER_WEIGHTS).is_file():
        raise RelexError(f"{folder}: {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG} (a PEFT adapter is merged with "
                         "its config's r, lora_alpha and patterns; copy the config saved with the adapter)")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {shards[0]} but no {SAFE_WEIGHTS}.index.json naming the shards)" if shards else ""
    raise RelexError(f"{folder}: no model weights found (expected {SAFE_WEIGHTS} or an index of shards){hint}")


def _indexed(index: Path) -> list[Path]:
    """The shard files an index's weight map names, in order of first appearance, each a regular file in the
    index's folder (a name that leaves it, by '..', an absolute path or a link, is refused)."""
    weight_map = read_json_object(index, {"weight_map": dict[str, str]}).get("weight_map")
    if not weight_map:
        raise RelexError(f"{index}: no weight_map in the index")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = inside(index.parent, name, index, "weight_map")
        if shard is None:
            raise RelexError(f"{index.parent / name}: weight file listed in the index is missing")
        shards.append(shard)
    return shards


def _not_zip(file: Path) -> RelexError:
    """What a .bin that is no zip archive is: the legacy torch.save format (a bare pickle), or not a checkpoint."""
    with open(file, "rb") as handle:
        legacy = handle.read(1) == pickle.PROTO
    if legacy:
        return RelexError(f"{file}: legacy torch.save format (a bare pickle, not the zip archive of PyTorch >= 1.6), "
                          "which relex does not read; convert it: load the model with torch yourself and save it "
                          "with save_pretrained(..., safe_serialization=True)")
    return RelexError(f"{file}: corrupt or truncated weight file (not a zip archive, as torch.save writes)")


def weights_only_refusal(exc: Exception) -> tuple[bool, str]:
    """(blocked, reason) of an error torch's weights_only unpickler raised: blocked when the pickle names a global it
    refuses (code it could run), not a corrupt file; the reason is the line of torch's message that says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    named = next((line for line in lines if "GLOBAL" in line), None)
    reason = named or (lines[-2] if len(lines) > 2 else lines[0])  # torch's message: advice, reason, a link
    return named is not None, reason[:200]


def _pickle_refused(file: Path, exc: Exception) -> RelexError:
    """One line for a pickle torch.load(weights_only=True) failed on: blocked (it names code to run), or corrupt."""
    blocked, reason = weights_only_refusal(exc)
    if blocked:
        return RelexError(f"{file}: blocked: the pickle holds something torch.load(weights_only=True) refuses, as "
                          f"it could run code ({reason})")
    return RelexError(f"{file}: corrupt or truncated weight file ({reason})")


@dataclass(frozen=True)
class _Location:
    """Where a tensor's bytes are: file and absolute byte offset of its first element."""

    file: Path
    offset: int


def exact_delta(value: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W - W_0 in float64 from W's stored values and W_0's float64 ``base`` (the upcast and the subtraction are
    exact), with ``base``'s shape and device; written into ``out`` when given (no temporary for a caller's stack)."""
    value = value.reshape(base.shape)
    if out is None:
        return value.to(device=base.device, dtype=torch.float64) - base
    return out.copy_(value).sub_(base)


class CheckpointReader:
    """Tensor names, specs and row-block reads for one model folder.

    No file stays open between reads: a run of many checkpoints times many shards never meets the
    open-file limit, and a checkpoint deleted during the run is refused by name, not read stale.
    """

    stores_weights = True  # its files hold W itself (an adapter's hold factors of W - W_0)

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
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
        if not zipfile.is_zipfile(file):
            raise _not_zip(file)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise _pickle_refused(file, exc) from None
        if not isinstance(state, dict):
            raise RelexError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise RelexError(f"{file}: entry '{name}' is a {type(value).__name__}, not a tensor")
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
        if count:
            try:
                got = read_exact(where.file, raw.numpy(), where.offset + start * row_bytes)
            except OSError as exc:
                raise RelexError(f"{where.file}: cannot read tensor '{name}' ({exc.strerror or exc}; "
                                 "was the checkpoint removed or rewritten during the run?)") from None
            if got != count:
                raise RelexError(f"{where.file}: tensor '{name}' is truncated")
        shape = spec.shape and (stop - start,) + spec.shape[1:]
        return raw.view(spec.dtype).reshape(shape)

    def read_delta(self, name: str, start: int = 0, stop: int | None = None, *, base: torch.Tensor,
                   out: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of W - W_0 in float64, given W_0's rows as ``base`` (float64; the result has its
        shape and device). The upcast and the subtraction are exact. Written into ``out`` when given, so a
        caller's stack needs no temporary; ``buffer`` as in ``read``.
        """
        return exact_delta(self.read(name, start, stop, buffer), base, out)

    def delta_factors(self, name: str) -> None:
        """None: a checkpoint of whole weights has its delta only as ``read_delta`` (an adapter's has factors)."""
        return None

    def close(self) -> None:
        """Nothing held open: each read opens its file briefly."""

    def fingerprint(self) -> list[list]:
        """(file, size, mtime, ctime, inode) of each weight file: tells a stale statistics cache from a valid one.

        ctime and inode change on any rewrite, even one that keeps the size and restores the mtime.
        """
        return [file_fingerprint(f) for f in self.files]


def file_fingerprint(file: Path) -> list:
    """Identity of a file's contents as the file system reports it; a vanished file is refused by name."""
    try:
        st = file.stat()
    except OSError as exc:
        raise RelexError(f"{file}: cannot stat ({exc.strerror or exc})") from None
    return [str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_exact(file: Path, out: "np.ndarray", offset: int) -> int:
    """Read ``out.nbytes`` bytes of ``file`` from ``offset`` into ``out``; returns the count (short at EOF).

    Loops on short reads: Linux caps one ``preadv`` at 0x7ffff000 bytes, less than a big tensor.
    """
    view = memoryview(out).cast("B")
    done = 0
    fd = os.open(file, os.O_RDONLY)
    try:
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                break
            done += got
    finally:
        os.close(fd)
    return done
