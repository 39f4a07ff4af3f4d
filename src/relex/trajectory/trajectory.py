"""A base model plus the checkpoints of one run: the input of every method."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from relex.errors import RelexError
from relex.safeio import read_json_object, regular_file
from relex.trajectory.deltas import BufferPool, ReadDeltas
from relex.trajectory.discover import Checkpoint, check_steps, discover_checkpoints, parse_checkpoint_args
from relex.trajectory.peft import AdapterReader, is_adapter_folder
from relex.trajectory.reader import CheckpointReader, TensorSpec

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"
# The keys relex reads from the base's config.json and the JSON type each must have.
_CONFIG_SHAPE = {"tie_word_embeddings": bool, "vocab_size": int | None, "text_config": dict[str, object] | None,
                 "auto_map": dict[str, str | list[str | None]]}


@dataclass
class Trajectory:
    """theta_0 (``base``) and the saved checkpoints theta_t, ordered by their real step number."""

    base: Path
    checkpoints: list[Checkpoint]
    allow_pickle: bool = False
    run: Path | None = None  # the run folder the checkpoints were discovered in, if any
    _readers: dict[Path, CheckpointReader | AdapterReader] = field(default_factory=dict, repr=False)

    @classmethod
    def discover(cls, base: str | Path, run: str | Path | None = None,
                 checkpoints: list[str] | dict[int, str | Path] | None = None,
                 allow_pickle: bool = False) -> "Trajectory":
        """Checkpoints found under ``run``, or named explicitly as ``{step: path}`` / ``["STEP=PATH"]``."""
        if checkpoints:
            if isinstance(checkpoints, dict):
                found = check_steps([Checkpoint(int(s), Path(p)) for s, p in checkpoints.items()])
            else:
                found = parse_checkpoint_args(list(checkpoints))
        elif run is not None:
            found = discover_checkpoints(Path(run))
        else:
            raise RelexError("give a run folder (--run) or checkpoints (--checkpoint STEP=PATH)")
        base = Path(base)
        if not base.is_dir():
            raise RelexError(f"{base}: base model folder not found")
        return cls(base, found, allow_pickle, Path(run) if run is not None and not checkpoints else None)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def observed(self, cutoff: int | None, minimum: int = 2) -> "Trajectory":
        """The checkpoints with step <= cutoff; a line needs at least two of them (ExPO: ``minimum=1``).

        A step without readable weights (verl's FSDP shards only) is refused if observed, skipped past the cutoff.
        """
        if cutoff is None:
            kept = list(self.checkpoints)
        else:
            if cutoff < self.steps[0]:
                raise RelexError(f"cutoff {cutoff} is below the first checkpoint step {self.steps[0]}")
            kept = [c for c in self.checkpoints if c.step <= cutoff]
        for ckpt in self.checkpoints:
            if ckpt.unusable and ckpt in kept:
                raise RelexError(ckpt.unusable)
            if ckpt.unusable:
                log.warning("%s; skipped, it is past the cutoff %s", ckpt.unusable, cutoff)
        if len(kept) < minimum:
            need = "a line needs at least two" if minimum == 2 else f"at least {minimum} needed"
            raise RelexError(f"only {len(kept)} checkpoint(s) observed up to cutoff {cutoff}: "
                             f"{need} (steps found: "
                             f"{', '.join(map(str, self.steps[:8]))}{'...' if len(self.steps) > 8 else ''})")
        return Trajectory(self.base, kept, self.allow_pickle, self.run, self._readers)

    def reader(self, folder: Path) -> CheckpointReader | AdapterReader:
        """The folder's reader: a PEFT LoRA adapter checkpoint reads as deltas of the base's tensors."""
        if folder not in self._readers:
            if folder != self.base and is_adapter_folder(folder):
                self._readers[folder] = AdapterReader(folder, self.reader(self.base))
            else:
                self._readers[folder] = CheckpointReader(folder, self.allow_pickle)
        return self._readers[folder]

    def deltas(self, name: str, block_bytes: int, buffers: BufferPool | None = None) -> ReadDeltas:
        """One tensor's deltas over the checkpoints, read in row blocks of at most ``block_bytes`` (see ReadDeltas;
        ``buffers``: where the blocks land, a fresh CPU pool by default)."""
        return ReadDeltas(self.reader(self.base), [self.reader(c.path) for c in self.checkpoints], name, block_bytes,
                          buffers or BufferPool())

    def base_config(self) -> dict:
        """The base's config.json, read bounded and typed (relex.safeio): NaN or Infinity in it is refused, as the
        outputs' copies must be strict JSON."""
        path = self.base / "config.json"
        if not regular_file(path):
            raise RelexError(f"{self.base}: base model has no config.json")
        return read_json_object(path, _CONFIG_SHAPE)

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """The tensors every checkpoint must share with the base, checked name by name.

        A tied ``lm_head.weight`` is the embedding: it is dropped wherever it was saved separately.
        """
        base = self.reader(self.base)
        config = self.base_config()
        tied = config.get("tie_word_embeddings", TIED_HEAD not in base.specs)
        specs = {n: s for n, s in base.specs.items() if not (tied and n == TIED_HEAD)}
        for ckpt in self.checkpoints:
            reader = self.reader(ckpt.path)
            names = {n for n in reader.specs if not (tied and n == TIED_HEAD)}
            missing = [n for n in specs if n not in names]
            if missing:
                raise RelexError(f"{reader.files[0]}: tensor '{missing[0]}' of the base is missing "
                                 f"({len(missing)} missing)")
            extra = sorted(names - specs.keys())
            if extra:
                raise RelexError(f"{reader.file_of(extra[0])}: tensor '{extra[0]}' is not in the base")
            for name, spec in specs.items():
                other = reader.specs[name]
                if other.shape != spec.shape:
                    raise RelexError(f"{reader.file_of(name)}: tensor '{name}' has shape {list(other.shape)}, "
                                     f"base has {list(spec.shape)}")
                if other.dtype != spec.dtype:
                    raise RelexError(f"{reader.file_of(name)}: tensor '{name}' has dtype "
                                     f"{str(other.dtype).removeprefix('torch.')}, base has "
                                     f"{str(spec.dtype).removeprefix('torch.')}")
        return specs
