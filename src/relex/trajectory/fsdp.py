"""verl's FSDP checkpoints read in place: ``global_step_N/actor/model_world_size_W_rank_R.pt``, one per rank.

Each file is a ``torch.save`` of the rank's sharded state dict: DTensors (FSDP2's ``fully_shard``, and FSDP1
given a device mesh, as verl gives it) whose local tensor is the rank's share of the rows (``Shard(0)``) or
the whole tensor (``Replicate()``). Only the pickles are read up front, by torch's weights_only unpickler
with the DTensor classes PyTorch itself allow-lists (``torch.distributed.tensor`` registers them); rows are
read when asked, at the dtype saved (fp32 masters stay fp32). What cannot be read this way is refused in one
line naming verl's converter.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.safeio import regular_file
from relex.trajectory.archive import Archive
from relex.trajectory.reader import TensorSpec
from relex.trajectory.rowshards import RowPiece, RowShardReader

SHARD = re.compile(r"model_world_size_(\d{1,6})_rank_(\d{1,6})\.pt")


def merge_command(folder: Path) -> str:
    """verl's converter of the actor folder ``folder`` into a Hugging Face folder relex reads."""
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {folder} "
            f"--target_dir {folder / 'huggingface'}")


def _convert(folder: Path) -> str:
    return f"; convert the step with `{merge_command(folder)}`"


def has_shards(folder: Path) -> bool:
    """Whether ``folder`` holds verl FSDP model shards (complete or not)."""
    return any(SHARD.fullmatch(p.name) for p in Path(folder).glob("model_world_size_*_rank_*.pt"))


def shard_files(folder: Path) -> list[Path]:
    """The model shards of a verl actor folder in rank order: every rank of one world size, each a regular file
    that is a zip archive (as torch.save writes); anything else is refused in one line."""
    folder = Path(folder)
    worlds: dict[int, dict[int, Path]] = {}
    for path in folder.glob("model_world_size_*_rank_*.pt"):
        match = SHARD.fullmatch(path.name)
        if match:
            worlds.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    if not worlds:
        raise RelexError(f"{folder}: no FSDP model shards (model_world_size_W_rank_R.pt)")
    if len(worlds) > 1:
        raise RelexError(f"{folder}: FSDP shards of world sizes {sorted(worlds)} side by side (two saves mixed)")
    [(world, ranks)] = worlds.items()
    missing = [r for r in range(world) if r not in ranks]
    if missing or len(ranks) != world:
        first = folder / f"model_world_size_{world}_rank_{missing[0] if missing else max(ranks)}.pt"
        raise RelexError(f"{first}: {'missing' if missing else 'a rank beyond the world size'} "
                         f"({len(ranks)} shard(s) for world size {world}){_convert(folder)}")
    files = [ranks[r] for r in range(world)]
    for path in files:
        if not regular_file(path) or not zipfile.is_zipfile(path):
            raise RelexError(f"{path}: not a torch.save archive (corrupt or truncated){_convert(folder)}")
    return files


class FsdpShardReader(RowShardReader):
    """A verl actor folder's per-rank FSDP model shards, read as one checkpoint of whole tensors."""

    def __init__(self, folder: Path) -> None:
        import torch.distributed.tensor  # noqa: F401  (registers DTensor and its placements as weights_only-safe)

        super().__init__(folder, shard_files(folder))
        archives = [Archive(f, refusal=_convert(self.folder)) for f in self.files]
        states = [self._state(a) for a in archives]
        for name in states[0]:
            for archive, state in zip(archives, states):
                if name not in state:
                    raise RelexError(f"{archive.file}: tensor '{name}' of rank 0 is missing{_convert(self.folder)}")
            spec, pieces = self._rows_of(name, archives, [s[name] for s in states])
            self.add(name, spec, pieces)
        for archive, state in zip(archives, states):
            extra = next((n for n in state if n not in self.specs), None)
            if extra is not None:
                raise RelexError(f"{archive.file}: tensor '{extra}' is not in rank 0's shard{_convert(self.folder)}")

    def _state(self, archive: Archive) -> dict:
        if not isinstance(archive.value, dict):
            raise RelexError(f"{archive.file}: holds a {type(archive.value).__name__}, not a state dict"
                             f"{_convert(self.folder)}")
        for name, value in archive.value.items():
            if not isinstance(value, torch.Tensor):
                raise RelexError(f"{archive.file}: entry '{name}' is a {type(value).__name__}, not a tensor"
                                 f"{_convert(self.folder)}")
        return archive.value

    def _rows_of(self, name: str, archives: list[Archive], values: list[torch.Tensor]) -> tuple[TensorSpec, list]:
        """The tensor's spec and row pieces, from each rank's value: a DTensor sharded by rows or replicated, or
        (world size 1) a plain tensor."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        def piece(archive: Archive, local: torch.Tensor, start: int) -> RowPiece:
            stored = archive.locate(local, name)
            return RowPiece(start, start + stored.rows, archive.file, lambda: stored)

        first = values[0]
        if not isinstance(first, DTensor):
            if len(values) > 1 or type(first) not in (torch.Tensor, torch.nn.Parameter):
                raise RelexError(f"{archives[0].file}: tensor '{name}' is a {type(first).__name__}, not a DTensor, "
                                 f"in a {len(values)}-rank save{_convert(self.folder)}")
            stored = archives[0].locate(first, name)
            return TensorSpec(stored.shape, stored.dtype), [piece(archives[0], first, 0)]
        shape, placements = tuple(first.shape), tuple(first.placements)
        for archive, value in zip(archives, values):
            if not isinstance(value, DTensor) or tuple(value.shape) != shape or tuple(value.placements) != placements:
                raise RelexError(f"{archive.file}: tensor '{name}' is not placed as on rank 0{_convert(self.folder)}")
        spec = TensorSpec(shape, first._local_tensor.dtype)
        if len(placements) == 1 and type(placements[0]) is Replicate:
            return spec, [piece(archives[0], first._local_tensor, 0)]
        if len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
            raise RelexError(f"{archives[0].file}: tensor '{name}' is placed {list(placements)}; relex reads in place "
                             f"only Shard(0) or Replicate() over one mesh dimension{_convert(self.folder)}")
        pieces, row = [], 0
        for archive, value in zip(archives, values):
            local = value._local_tensor
            if local.dtype != spec.dtype or tuple(local.shape[1:]) != shape[1:]:
                raise RelexError(f"{archive.file}: tensor '{name}' has a local shard of {list(local.shape)} "
                                 f"{local.dtype}, not rows of {list(shape)} {spec.dtype}{_convert(self.folder)}")
            pieces.append(piece(archive, local, row))
            row += local.shape[0]
        return spec, pieces
