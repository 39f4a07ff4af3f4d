"""A base model plus the checkpoints of one run: the input of every method."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from relex.errors import RelexError
from relex.safeio import read_json_object, regular_file
from relex.trajectory.dcp import DcpReader, is_dcp_folder
from relex.trajectory.deltas import BufferPool, ReadDeltas
from relex.trajectory.discover import Checkpoint, check_steps, discover_checkpoints, parse_checkpoint_args
from relex.trajectory.fsdp import FsdpShardReader, has_shards
from relex.trajectory.peft import AdapterReader, is_adapter_folder
from relex.trajectory.reader import CheckpointReader, TensorSpec
from relex.trajectory.recast import Widened, widened

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"
# The keys relex reads from the base's config.json and the JSON type each must have.
_CONFIG_SHAPE = {"tie_word_embeddings": bool, "vocab_size": int | None, "text_config": dict[str, object] | None,
                 "auto_map": dict[str, str | list[str | None]]}
Reader = CheckpointReader | AdapterReader | FsdpShardReader | DcpReader | Widened


def open_weights(folder: Path, allow_pickle: bool = False,
                 names: frozenset[str] | dict = frozenset()) -> CheckpointReader | FsdpShardReader | DcpReader:
    """The reader of a folder of whole weights, by what it holds: a DCP index (``names``: the base's, for its
    prefix), verl FSDP shards without Hugging Face weights beside them, or a Hugging Face folder."""
    if is_dcp_folder(folder):
        return DcpReader(folder, names)
    if has_shards(folder) and not any(folder.glob("*.safetensors")):
        return FsdpShardReader(folder)
    return CheckpointReader(folder, allow_pickle)


@dataclass
class Trajectory:
    """theta_0 (``base``) and the saved checkpoints theta_t, ordered by their real step number."""

    base: Path
    checkpoints: list[Checkpoint]
    allow_pickle: bool = False
    run: Path | None = None  # the run folder the checkpoints were discovered in, if any
    _readers: dict[Path, Reader] = field(default_factory=dict, repr=False)
    warned: set[str] = field(default_factory=set, repr=False)  # warnings given once, shared with observed() windows

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
        return Trajectory(self.base, kept, self.allow_pickle, self.run, self._readers, self.warned)

    def reader(self, folder: Path) -> Reader:
        """The folder's reader: a PEFT LoRA adapter checkpoint reads as deltas of the base's tensors; whole weights
        stored at another floating precision than the base's (fp32 masters, bf16 base) as exact float64 deltas."""
        if folder not in self._readers:
            if folder == self.base:
                self._readers[folder] = open_weights(folder, self.allow_pickle)
            else:
                base = self.reader(self.base)
                if is_adapter_folder(folder):
                    self._readers[folder] = AdapterReader(folder, base)
                else:
                    weights = open_weights(folder, self.allow_pickle, frozenset(base.specs))
                    self._readers[folder] = widened(weights, base.specs)
        return self._readers[folder]

    def stored_dtypes(self) -> dict[str, dict[str, int]]:
        """How many tensors each checkpoint (and the base) stores in each dtype, as saved: the precision the run's
        deltas were measured at ("base" and each step as keys; a LoRA adapter's are its base's)."""
        out = {}
        for key, folder in [("base", self.base), *((str(c.step), c.path) for c in self.checkpoints)]:
            reader = self.reader(folder)
            counts: dict[str, int] = {}
            for spec in getattr(reader, "stored_specs", reader.specs).values():
                name = str(spec.dtype).removeprefix("torch.")
                counts[name] = counts.get(name, 0) + 1
            out[key] = counts
        return out

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
                if other.dtype != spec.dtype:  # floating dtypes that differ were widened (recast.Widened)
                    raise RelexError(f"{reader.file_of(name)}: tensor '{name}' has dtype "
                                     f"{str(other.dtype).removeprefix('torch.')}, base has "
                                     f"{str(spec.dtype).removeprefix('torch.')}")
        return specs
