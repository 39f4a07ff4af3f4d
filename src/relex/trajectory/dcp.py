"""torch distributed checkpoints (DCP) read in place: a folder of ``.metadata`` and ``__R_I.distcp`` files.

NeMo-RL saves its policy this way (``step_N/policy/weights/``), as does Megatron's ``torch_dist`` format.
``.metadata`` is a pickle: it is read by an unpickler that resolves only DCP's own metadata classes,
``torch.Size``, torch dtypes and layouts (anything else is refused before it is called). It says, for every
tensor, its shape, dtype and chunks, and where each chunk is (file, byte offset, length); a chunk is a
``torch.save`` blob (located by ``archive.Archive``, weights_only) or raw bytes. Chunks that split a tensor by
rows are joined by their offsets; any other split is refused. Tensors saved under a ``model.`` prefix
(NeMo-RL's ``{"model": state}``) are matched to the base's names without it.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any, Collection

import torch

from relex.errors import RelexError
from relex.safeio import inside, regular_file
from relex.trajectory.archive import Archive, StoredTensor
from relex.trajectory.reader import TensorSpec
from relex.trajectory.rowshards import RowPiece, RowShardReader

METADATA = ".metadata"
MAX_METADATA_BYTES = 512 << 20  # the index of a 100K-chunk checkpoint is tens of MB
PREFIXES = ("", "model.")  # NeMo-RL saves {"model": state_dict}: DCP flattens it to "model.<name>"
_ZIP_MAGIC = b"PK\x03\x04"


def _allowed() -> dict[tuple[str, str], Any]:
    """The globals a DCP index may name, each a data class or a lookup that runs nothing else."""
    from torch.distributed.checkpoint import filesystem, metadata

    names = ["Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
             "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta"]
    allowed: dict[tuple[str, str], Any] = {("torch.distributed.checkpoint.metadata", n): getattr(metadata, n)
                                           for n in names}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = dict
    for path in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):  # StorageMeta.checkpoint_id
        allowed[("pathlib", path)] = pathlib.PurePosixPath if "Posix" in path else pathlib.PureWindowsPath
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals of ``_allowed()`` and torch dtypes; any other is refused before it is called."""

    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not one of DCP's metadata classes")


def is_dcp_folder(folder: Path) -> bool:
    """A DCP checkpoint: ``.metadata`` (a regular file) beside ``*.distcp`` files."""
    folder = Path(folder)
    return regular_file(folder / METADATA) and any(folder.glob("*.distcp"))


def read_metadata(folder: Path) -> Any:
    """The DCP index of ``folder``, unpickled with only DCP's metadata classes allowed (one line otherwise)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA
    if not regular_file(path):
        raise RelexError(f"{path}: missing (a DCP checkpoint's index)")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise RelexError(f"{path}: {path.stat().st_size} bytes, more than a DCP index relex reads")
    unpickler = _MetadataUnpickler(io.BytesIO(path.read_bytes()))
    unpickler.allowed = _allowed()
    try:
        value = unpickler.load()
    except Exception as exc:  # whatever a hostile or broken pickle provokes is a refusal
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise RelexError(f"{path}: refused: {reason} (relex unpickles only DCP's metadata classes)") from None
    if not isinstance(value, Metadata):
        raise RelexError(f"{path}: holds a {type(value).__name__}, not DCP metadata")
    return value


def _prefix(fqns: Collection[str], names: Collection[str]) -> str:
    """The prefix under which the saved names match the base's most often ('' when no base names are given)."""
    if not names:
        return ""
    counts = {p: sum(1 for f in fqns if f.startswith(p) and f[len(p):] in names) for p in PREFIXES}
    return max(PREFIXES, key=lambda p: counts[p])


class DcpReader(RowShardReader):
    """A DCP folder's tensors as one checkpoint (``names``: the base's, to match NeMo-RL's ``model.`` prefix)."""

    def __init__(self, folder: Path, names: Collection[str] = ()) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        folder = Path(folder)
        self.index = folder / METADATA
        metadata = read_metadata(folder)
        try:
            tensors = {f: m for f, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
            where = {(i.fqn, tuple(i.offset or ())): s for i, s in metadata.storage_data.items()}
        except (AttributeError, TypeError) as exc:
            raise RelexError(f"{self.index}: malformed DCP metadata ({exc})") from None
        prefix = _prefix(tensors, names)
        if names and not any(f[len(prefix):] in names for f in tensors if f.startswith(prefix)):
            first = next(iter(tensors), "none")
            raise RelexError(f"{self.index}: no tensor is named as the base's (first: '{first}'; Megatron's "
                             "torch_dist names its own): convert the checkpoint to a Hugging Face folder first")
        super().__init__(folder, [])
        files: dict[str, Path] = {}
        for fqn, meta in tensors.items():
            if fqn.startswith(prefix):
                self._add_tensor(fqn, fqn[len(prefix):], meta, where, files)
        self.files = [self.index, *files.values()]

    def _add_tensor(self, fqn: str, name: str, meta: Any, where: dict, files: dict[str, Path]) -> None:
        try:
            shape = tuple(int(d) for d in meta.size)
            dtype = meta.properties.dtype
            chunks = [(tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)) for c in meta.chunks]
        except (AttributeError, TypeError, ValueError) as exc:
            raise RelexError(f"{self.index}: tensor '{fqn}' has malformed metadata ({exc})") from None
        if not isinstance(dtype, torch.dtype):
            raise RelexError(f"{self.index}: tensor '{fqn}' has no torch dtype")
        spec = TensorSpec(shape, dtype)
        pieces = []
        for offsets, sizes in chunks:
            if any(offsets[1:]) or sizes[1:] != shape[1:] or len(offsets) != len(shape):
                raise RelexError(f"{self.index}: tensor '{fqn}' is split at {list(offsets)} into {list(sizes)}; relex "
                                 "reads in place only chunks of whole rows")
            info = where.get((fqn, offsets))
            if info is None:
                raise RelexError(f"{self.index}: tensor '{fqn}' chunk at {list(offsets)} has no storage entry")
            if getattr(info, "transform_descriptors", None):
                raise RelexError(f"{self.index}: tensor '{fqn}' is stored transformed ({info.transform_descriptors}); "
                                 "relex reads plain DCP chunks only")
            relative = str(info.relative_path)
            if relative not in files:
                path = inside(self.folder, relative, self.index, "storage_data")
                if path is None:
                    raise RelexError(f"{self.folder / relative}: missing (named by {self.index})")
                files[relative] = path
            start = offsets[0] if shape else 0
            rows = sizes[0] if shape else 1
            pieces.append(RowPiece(start, start + rows, files[relative],
                                   _locator(files[relative], int(info.offset), int(info.length), sizes, dtype, fqn)))
        self.add(name, spec, pieces)


def _locator(file: Path, offset: int, length: int, shape: tuple[int, ...], dtype: torch.dtype, fqn: str):
    """Finds one chunk's bytes when first read: a torch.save blob's tensor, or raw bytes of exactly its size."""
    def locate() -> StoredTensor:
        with open(file, "rb") as handle:
            handle.seek(offset)
            magic = handle.read(len(_ZIP_MAGIC))
        numel = 1
        for d in shape:
            numel *= d
        if magic != _ZIP_MAGIC:
            if length != numel * dtype.itemsize:
                raise RelexError(f"{file}: tensor '{fqn}' at byte {offset} is neither a torch.save blob nor raw bytes "
                                 "of its size (corrupt or truncated)")
            return StoredTensor(file, offset, shape, dtype)
        archive = Archive(file, offset, length)
        if type(archive.value) is not torch.Tensor:
            raise RelexError(f"{file}: tensor '{fqn}' at byte {offset} holds a {type(archive.value).__name__}")
        stored = archive.locate(archive.value, fqn)
        if stored.shape != shape or stored.dtype != dtype:
            raise RelexError(f"{file}: tensor '{fqn}' at byte {offset} is {list(stored.shape)} {stored.dtype}, the "
                             f"index says {list(shape)} {dtype}")
        return stored
    return locate
