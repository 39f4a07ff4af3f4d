"""Find the checkpoints of a training run on disk and order them by their real step number.

Layouts: TRL/transformers ``checkpoint-N/``, verl ``global_step_N/`` (its ``actor/huggingface/``, else the
FSDP shards in ``actor/``), OpenRLHF ``global_stepN_hf/``, plain ``step-N/`` or ``step_N/`` (NeMo-RL's DCP
``policy/weights/`` inside); or explicit ``STEP=PATH`` pairs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexError
from relex.trajectory.dcp import is_dcp_folder
from relex.trajectory.fsdp import has_shards, merge_command, shard_files

log = logging.getLogger(__name__)

MAX_STEP = 10**15  # below 2**53: every step, and every difference of two, is exact in float64

_LAYOUTS = [
    (re.compile(r"checkpoint-(\d+)"), "trl"),
    (re.compile(r"global_step_(\d+)"), "verl"),
    (re.compile(r"global_step(\d+)_hf"), "openrlhf"),
    (re.compile(r"step[-_](\d+)"), "plain"),
]
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
RELEX_OUTPUT_MARKER = "relex.json"  # every folder relex writes carries it; such folders are never checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One saved model: the optimizer step it was saved at and the folder holding its weights."""

    step: int
    path: Path
    unusable: str | None = None  # why its weights cannot be read (verl's shards incomplete): refused if observed


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(g)) for g in _WEIGHT_GLOBS)


NEMO_RL_WEIGHTS = Path("policy") / "weights"  # NeMo-RL's DCP save of the policy inside step_N/


def model_folder(folder: Path, layout: str) -> Path:
    """The folder with the weights inside a saved step: verl's actor/huggingface, else its FSDP shards in actor/
    (all ranks present, each a torch.save archive; otherwise refused naming verl's model_merger); NeMo-RL's
    policy/weights DCP folder inside a plain step without weights of its own."""
    if layout == "verl":
        actor = folder / "actor"
        hf = actor / "huggingface"
        if hf.is_dir() and _has_weights(hf):
            return hf
        if has_shards(actor):
            shard_files(actor)
            return actor
        raise RelexError(
            f"{folder}: no Hugging Face weights in actor/huggingface/ and no FSDP model shards in actor/; convert the "
            f"step with `{merge_command(actor)}`, or pass --checkpoint STEP=PATH")
    if layout == "plain" and not _has_weights(folder) and is_dcp_folder(folder / NEMO_RL_WEIGHTS):
        return folder / NEMO_RL_WEIGHTS
    return folder


def step_folders(run: Path, warn: bool = True) -> list[tuple[int, Path, str]]:
    """(step, folder, layout) of every child of ``run`` named like a saved step; relex's own outputs skipped
    (with a warning unless ``warn`` is False, for callers that scan the same folder again and again)."""
    found = []
    for child in sorted(Path(run).iterdir()):
        if not child.is_dir():
            continue
        if (child / RELEX_OUTPUT_MARKER).is_file():
            if warn:
                log.warning("%s: skipped, it is a prediction written by relex (it has %s), not a training checkpoint",
                            child, RELEX_OUTPUT_MARKER)
            continue
        for pattern, layout in _LAYOUTS:
            match = pattern.fullmatch(child.name)
            if match:
                found.append((parse_step(match.group(1), child), child, layout))
                break
    return found


def discover_checkpoints(run: Path) -> list[Checkpoint]:
    """Checkpoints saved during training under ``run``, sorted by step; duplicates are an error."""
    run = Path(run)
    if not run.is_dir():
        raise RelexError(f"{run}: run folder not found")
    found = [_checkpoint(step, child, layout) for step, child, layout in step_folders(run)]
    if not found:
        raise RelexError(f"{run}: no checkpoints found (expected checkpoint-N/, global_step_N/, "
                         "global_stepN_hf/, step-N/ or step_N/ folders)")
    return check_steps(found)


def _checkpoint(step: int, folder: Path, layout: str) -> Checkpoint:
    """The step's checkpoint; one without readable weights is kept with the reason (``Trajectory.observed``
    refuses it when observed and skips it, with a warning, past the cutoff)."""
    try:
        return Checkpoint(step, model_folder(folder, layout))
    except RelexError as exc:
        return Checkpoint(step, folder, unusable=str(exc))


def parse_step(text: str, where: Path | str) -> int:
    """A step number's digits (a folder name's, STEP=PATH's) as an int, refused above MAX_STEP in one line
    (read by length first: Python refuses to convert more than 4300 digits)."""
    digits = text.strip().lstrip("0") or "0"
    if len(digits) > len(str(MAX_STEP)) or int(digits) > MAX_STEP:
        raise RelexError(f"{where}: step {digits[:20]}{'...' if len(digits) > 20 else ''} is above 10**15, the "
                         "largest step relex fits exactly")
    return int(digits)


def parse_checkpoint_args(pairs: list[str]) -> list[Checkpoint]:
    """``STEP=PATH`` strings (from ``--checkpoint``) to checkpoints."""
    out = []
    for pair in pairs:
        step, sep, path = pair.partition("=")
        if not sep or not step.strip().isdigit():
            raise RelexError(f"--checkpoint {pair!r}: expected STEP=PATH with an integer step")
        out.append(Checkpoint(parse_step(step, f"--checkpoint {path}"), Path(path)))
    return check_steps(out)


def check_steps(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Sort by step and refuse two checkpoints claiming the same step or a step below 1."""
    by_step: dict[int, Checkpoint] = {}
    for ckpt in checkpoints:
        if ckpt.step > MAX_STEP:
            parse_step(str(ckpt.step), ckpt.path)
        if ckpt.step < 1:
            raise RelexError(f"{ckpt.path}: step {ckpt.step} must be >= 1 (the base is step 0: give that model as "
                             "--base and move it out of the run folder, or name the checkpoints with --checkpoint)")
        if (ckpt.path / RELEX_OUTPUT_MARKER).is_file():
            raise RelexError(f"{ckpt.path}: is a prediction written by relex (it has {RELEX_OUTPUT_MARKER}), "
                             "not a training checkpoint")
        if ckpt.step in by_step:
            raise RelexError(f"{ckpt.path}: step {ckpt.step} is also claimed by {by_step[ckpt.step].path}")
        if not ckpt.path.is_dir():
            raise RelexError(f"{ckpt.path}: checkpoint folder not found")
        by_step[ckpt.step] = ckpt
    return [by_step[s] for s in sorted(by_step)]
