"""Tensors that ``torch.save`` wrote, located without loading them: where each one's bytes lie in the file.

A torch.save file is a zip archive (stored, not compressed) of a pickle (``data.pkl``) and one record per
storage (``data/K``). The pickle is read by the unpickler ``torch.load(weights_only=True)`` runs, so only the
globals torch allows (and those the caller allows) can be named; its storages are made on the ``meta``
device, so nothing but the pickle is read. Each tensor found is then a ``StoredTensor``: file, byte offset
and shape, read row by row later with ``preadv`` (``read_rows``), as safetensors files are.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler

from relex.errors import RelexError
from relex.trajectory.reader import read_exact, weights_only_refusal

MAX_PICKLE_BYTES = 256 << 20  # a sharded state dict of 100K tensors pickles to a few MB
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


@dataclass(frozen=True)
class StoredTensor:
    """A row-major tensor's bytes in a file: element [0, ..., 0] at ``offset``."""

    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        numel = 1
        for d in self.shape[1:]:
            numel *= d
        return numel * self.dtype.itemsize


class _Window(io.RawIOBase):
    """Bytes ``start:start + length`` of a file as a seekable file of their own (a DCP blob inside a .distcp)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        want = max(0, min(len(buffer), self.length - self.pos))
        got = os.preadv(self.fd, [memoryview(buffer)[:want]], self.start + self.pos) if want else 0
        self.pos += got
        return got


@contextmanager
def _opened(file: Path, start: int, length: int | None) -> Iterator[zipfile.ZipFile]:
    """The zip archive at ``file[start:start + length]`` (the whole file by default); refused if it is none."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise RelexError(f"{file}: cannot open ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fd).st_size
        length = size - start if length is None else length
        if start < 0 or length < 0 or start + length > size:
            raise RelexError(f"{file}: truncated (bytes {start}..{start + length} of a {size}-byte file)")
        window = io.BufferedReader(_Window(fd, start, length))
        try:
            archive = zipfile.ZipFile(window)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise RelexError(f"{file}: not a torch.save archive at byte {start} (corrupt or truncated: {exc})") from None
        with archive:
            yield archive
    finally:
        os.close(fd)


def _record_offset(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file: Path, start: int) -> int:
    """Absolute byte offset of a stored record's data (past its local header, name and alignment padding)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise RelexError(f"{file}: record {info.filename} is compressed (torch.save stores records as they are)")
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(_LOCAL_HEADER)
    if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise RelexError(f"{file}: record {info.filename} has no valid zip header (corrupt or truncated)")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return start + info.header_offset + _LOCAL_HEADER + name_len + extra_len


def _meta_storage(saved_id: tuple, keys: dict[int, str]) -> torch.storage.TypedStorage:
    """torch.load's persistent_load, with the storage made on ``meta`` (nothing read) and its key remembered."""
    if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] in ("storage", b"storage")):
        raise pickle.UnpicklingError(f"unexpected persistent id {str(saved_id)[:60]}")
    _, storage_type, key, _, numel = saved_id
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
    if not isinstance(numel, int) or numel < 0 or not isinstance(key, str):
        raise pickle.UnpicklingError(f"malformed storage record {str(saved_id)[:60]}")
    untyped = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
    keys[untyped._cdata] = key
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


class Archive:
    """The object one torch.save archive holds (``value``, its tensors on ``meta``), and where each tensor's
    bytes are (``locate``); ``refusal``: what a file that cannot be read this way should say to do instead."""

    def __init__(self, file: Path, start: int = 0, length: int | None = None, refusal: str = "") -> None:
        self.file, self.refusal = Path(file), refusal
        self._keys: dict[int, str] = {}
        self._records: dict[str, tuple[int, int]] = {}  # storage key -> (absolute data offset, bytes)
        with _opened(self.file, start, length) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise self._refused("no data.pkl record (not written by torch.save)")
            prefix = pickles[0][: -len("data.pkl")]
            order = prefix + "byteorder"
            if order in names and archive.read(order).decode(errors="replace") != sys.byteorder:
                raise self._refused("saved on a machine of the other byte order")
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise self._refused(f"data.pkl is {info.file_size} bytes, more than relex reads")
            self.value = self._unpickle(archive.read(pickles[0]))
            for name in names:
                if name.startswith(prefix + "data/"):
                    info = archive.getinfo(name)
                    self._records[name[len(prefix) + 5:]] = (_record_offset(archive, info, self.file, start),
                                                              info.file_size)

    def _refused(self, reason: str) -> RelexError:
        return RelexError(f"{self.file}: {reason}{self.refusal}")

    def _unpickle(self, data: bytes) -> Any:
        unpickler = WeightsOnlyUnpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = lambda saved_id: _meta_storage(saved_id, self._keys)
        mesh_log = logging.getLogger("torch.distributed.device_mesh")  # warns that no process group exists here
        level = mesh_log.level
        mesh_log.setLevel(logging.ERROR)
        try:
            return unpickler.load()
        except Exception as exc:  # the unpickler raises whatever a hostile pickle provokes; all are refusals
            blocked, reason = weights_only_refusal(exc)
            kind = "blocked: the pickle names code torch.load(weights_only=True) refuses to run" if blocked \
                else "corrupt or unreadable pickle"
            raise self._refused(f"{kind} ({reason})") from None
        finally:
            mesh_log.setLevel(level)

    def locate(self, tensor: torch.Tensor, name: str) -> StoredTensor:
        """Where tensor ``name`` (one of ``value``'s) lies in the file; a strided or overrunning one is refused."""
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
            raise self._refused(f"tensor '{name}' is a {type(tensor).__name__} relex cannot read in place")
        key = self._keys.get(tensor.untyped_storage()._cdata)
        if key not in self._records:
            raise self._refused(f"tensor '{name}' names a storage the archive does not hold")
        if not tensor.is_contiguous():
            raise self._refused(f"tensor '{name}' is not stored row-major")
        offset, size = self._records[key]
        end = (tensor.storage_offset() + tensor.numel()) * tensor.dtype.itemsize
        if end > size or tensor.untyped_storage().nbytes() > size:
            raise self._refused(f"tensor '{name}' is truncated ({size} of {end} bytes stored)")
        return StoredTensor(self.file, offset + tensor.storage_offset() * tensor.dtype.itemsize,
                            tuple(tensor.shape), tensor.dtype)


def read_rows(stored: StoredTensor, start: int, stop: int, out: torch.Tensor, name: str) -> None:
    """Rows ``start:stop`` of ``stored`` into ``out`` (uint8, exactly their bytes)."""
    count = out.numel()
    if not count:
        return
    try:
        got = read_exact(stored.file, out.numpy(), stored.offset + start * stored.row_bytes)
    except OSError as exc:
        raise RelexError(f"{stored.file}: cannot read tensor '{name}' ({exc.strerror or exc}; "
                         "was the checkpoint removed or rewritten during the run?)") from None
    if got != count:
        raise RelexError(f"{stored.file}: tensor '{name}' is truncated")
