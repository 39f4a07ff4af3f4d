"""A checkpoint whose tensors are split by rows across files (FSDP shards, DCP chunks), read as one model folder.

Each tensor is a list of row ranges, each stored whole in one file (``RowPiece``); a read of rows
``start:stop`` copies the overlapping part of each piece into one buffer with ``preadv``, so only the rows
asked for are read, at the dtype they were saved in. ``RowShardReader`` has CheckpointReader's interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from relex.errors import RelexError
from relex.trajectory.archive import StoredTensor, read_rows
from relex.trajectory.reader import TensorSpec, exact_delta, file_fingerprint


@dataclass
class RowPiece:
    """Rows ``start:stop`` of a tensor, stored in ``file``; ``locate`` finds their bytes (once, when first read)."""

    start: int
    stop: int
    file: Path
    locate: Callable[[], StoredTensor]
    _stored: StoredTensor | None = field(default=None, repr=False)

    def stored(self) -> StoredTensor:
        if self._stored is None:
            self._stored = self.locate()
        return self._stored


class RowShardReader:
    """Tensor names, specs and row-block reads for a checkpoint stored as row pieces in several files."""

    stores_weights = True

    def __init__(self, folder: Path, files: list[Path]) -> None:
        self.folder = Path(folder)
        self.files = files
        self.specs: dict[str, TensorSpec] = {}
        self._pieces: dict[str, list[RowPiece]] = {}

    def add(self, name: str, spec: TensorSpec, pieces: list[RowPiece]) -> None:
        """Record a tensor, refusing pieces that do not tile its rows exactly (a gap, an overlap, a missing shard)."""
        pieces = sorted(pieces, key=lambda p: p.start)
        row = 0
        for piece in pieces:
            if piece.start != row or piece.stop < piece.start:
                raise RelexError(f"{piece.file}: tensor '{name}' holds rows {piece.start}..{piece.stop} where row "
                                 f"{row} was expected (shards missing, overlapping or from another save)")
            row = piece.stop
        if row != spec.rows:
            raise RelexError(f"{self.folder}: tensor '{name}' has {row} of its {spec.rows} rows in the shards")
        self.specs[name] = spec
        self._pieces[name] = pieces

    def file_of(self, name: str) -> Path:
        return self._pieces[name][0].file

    def read(self, name: str, start: int = 0, stop: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` in its stored dtype (into ``buffer``, uint8, when given)."""
        spec = self.specs[name]
        stop = spec.rows if stop is None else min(stop, spec.rows)
        row_bytes = spec.row_numel * spec.dtype.itemsize
        count = max(stop - start, 0) * row_bytes
        raw = buffer[:count] if buffer is not None and buffer.numel() >= count else torch.empty(count, dtype=torch.uint8)
        for piece in self._pieces[name]:
            lo, hi = max(start, piece.start), min(stop, piece.stop)
            if lo >= hi:
                continue
            stored = piece.stored()
            if stored.dtype != spec.dtype or stored.rows != piece.stop - piece.start or stored.row_bytes != row_bytes:
                raise RelexError(f"{stored.file}: tensor '{name}' is stored as {list(stored.shape)} "
                                 f"{str(stored.dtype).removeprefix('torch.')}, where the index says rows "
                                 f"{piece.start}..{piece.stop} of {list(spec.shape)} "
                                 f"{str(spec.dtype).removeprefix('torch.')}")
            read_rows(stored, lo - piece.start, hi - piece.start,
                      raw[(lo - start) * row_bytes:(hi - start) * row_bytes], name)
        shape = spec.shape and (stop - start,) + spec.shape[1:]
        return raw.view(spec.dtype).reshape(shape)

    def read_delta(self, name: str, start: int = 0, stop: int | None = None, *, base: torch.Tensor,
                   out: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W - W_0 in float64, exact (as CheckpointReader.read_delta)."""
        return exact_delta(self.read(name, start, stop, buffer), base, out)

    def delta_factors(self, name: str) -> None:
        """None: whole weights, no factors."""
        return None

    def close(self) -> None:
        """Nothing held open: each read opens its file briefly."""

    def fingerprint(self) -> list[list]:
        """(file, size, mtime, ctime, inode) of each file read: tells a stale statistics cache from a valid one."""
        return [file_fingerprint(f) for f in self.files]
