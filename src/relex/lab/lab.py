"""The whole lab: pre-train a base, run GRPO, extrapolate from early checkpoints, evaluate, report.

Output (``out/``, built under a hidden temporary sibling and published only when complete, by
``relex.tempfiles.building``; an existing output is replaced only with ``overwrite`` and only if it is a lab's)::

    base/                                  the pre-trained model + tokenizer (theta_0)
    run/checkpoint-N/                      every GRPO checkpoint, TRL's layout (LoRA: the adapter only)
    extrapolated/<method>-cut<C>/step-T/   relex outputs for each method and cutoff
    report.json  report.md  accuracy.png
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from relex import Relex, Trajectory, TwoPoint, materialize
from relex.errors import RelexError
from relex.eval.cli import quiet_models
from relex.lab import report
from relex.lab.profiles import LoraSettings, Profile
from relex.lab.weights import drift, relative_weight_error
from relex.tempfiles import building, check_replaceable, refuse_overlap

LAB_LAYOUT = ("report.json", "report.md", "accuracy.png", "base", "run", "extrapolated", "heldout.jsonl",
              "verify.jsonl")
VERIFY_SIZE = 400  # problems in verify.jsonl: the task's distribution, never a held-out (test) problem


def quiet_libraries(quiet: bool) -> None:
    """Offline mode everywhere; the libraries' own bars off (the lab draws its own), warnings off with -q.

    TRL and transformers deprecation notices about each other are always hidden: a user cannot act on them.
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    quiet_models(quiet)
    import datasets

    datasets.disable_progress_bars()


def check_lab_out(out: Path, overwrite: bool, **inputs: Path | None) -> None:
    """Refuse a lab's ``out`` before any work: one that is or holds an input, an existing one without
    ``overwrite``, and one that is not a lab output (a run, a home folder ...), which is never replaced."""
    refuse_overlap(out, **inputs)
    check_replaceable(out, overwrite, LAB_LAYOUT, "relex lab")


class _Clock:
    """Wall time per phase, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def cutoff_steps(fractions: tuple[float, ...], last_step: int) -> list[int]:
    """Cutoffs as steps (at least 2, so a line has two points), from fractions of the run."""
    return sorted({max(2, round(f * last_step)) for f in fractions})


def lab_methods(cutoff: int) -> tuple[Relex, TwoPoint]:
    """The extrapolations every lab writes from a cutoff: RELEX (rank 1) and two-point."""
    return Relex(rank=1, cutoff=cutoff), TwoPoint(cutoff=cutoff)


def lab_targets(last: int) -> list[int]:
    """The steps every lab extrapolates to: T and 2T."""
    return [last, 2 * last]


def extrapolate(base_dir: Path, run_dir: Path, out_root: Path, cutoffs: list[int], targets: list[int],
                quiet: bool) -> dict[tuple[str, int], dict[int, Path]]:
    """Phase 5: ``lab_methods`` from each cutoff to each target."""
    traj = Trajectory.discover(base_dir, run_dir)
    outputs: dict[tuple[str, int], dict[int, Path]] = {}
    for cutoff in cutoffs:
        for method in lab_methods(cutoff):
            folders = materialize.extrapolate(method.fit(traj), out_root / f"{method.name}-cut{cutoff}",
                                              targets=targets, overwrite=True, cache=False, progress=not quiet)
            outputs[(method.name, cutoff)] = dict(zip(sorted(targets), folders, strict=True))
    return outputs


def extrapolate_and_measure(root: Path, task, last: int, cutoff_fractions: tuple[float, ...], curve_every: int,
                            clock: _Clock, quiet: bool, batch_size: int = 512,
                            device: str = "cpu") -> tuple[list[int], list[report.Row], list[report.Row], list[dict]]:
    """The phases every lab shares after GRPO: extrapolate from each cutoff to T and 2T, score the real curve
    and every prediction on the held-out set, and measure weight errors and drift. Returns the cutoffs, the
    real curve, the report's rows and the drift lines."""
    from relex.lab.evaluate import score_dirs

    base_dir, run_dir = root / "base", root / "run"
    cutoffs = cutoff_steps(cutoff_fractions, last)
    with clock.phase("extrapolate"):
        outputs = extrapolate(base_dir, run_dir, root / "extrapolated", cutoffs, lab_targets(last), quiet)
    with clock.phase("eval"):
        curve_steps = sorted({*range(curve_every, last + 1, curve_every), *cutoffs, last})
        real = {0: base_dir, **{s: run_dir / f"checkpoint-{s}" for s in curve_steps}}
        scores = score_dirs([*real.values(), *(p for o in outputs.values() for p in o.values())], task,
                            tokenizer_dir=base_dir, batch_size=batch_size, quiet=quiet, desc="eval",
                            adapter_base=base_dir, device=device)
    with clock.phase("weights"):
        curve, rows = _rows(root, real, outputs, scores, cutoffs)
        moves = [{"step": s, **m} for s, m in zip(curve_steps, drift(base_dir, [real[s] for s in curve_steps]))]
    return cutoffs, curve, rows, moves


def _rows(root: Path, real: dict[int, Path], outputs: dict[tuple[str, int], dict[int, Path]],
          scores: dict, cutoffs: list[int]) -> tuple[list[report.Row], list[report.Row]]:
    """The real-run curve and the report's rows (with relative weight errors where a real step exists, and each
    extrapolation paired with its cutoff checkpoint)."""

    def row(method: str, step: int, path: Path, cutoff: int | None = None, err: float | None = None,
            stop: Path | None = None) -> report.Row:
        score = scores[path]
        vs_stop, vs_stop_stderr = score.minus(scores[stop]) if stop is not None else (None, None)
        return report.Row(method, step, score.accuracy, score.stderr, cutoff, err, str(path.relative_to(root)),
                          vs_stop, vs_stop_stderr, score.outcome_string)

    last = max(real)
    curve = [row("base" if s == 0 else "rlvr", s, p) for s, p in real.items()]
    rows = [curve[0], *(row("rlvr", s, real[s], cutoff=s) for s in cutoffs), row("rlvr", last, real[last])]
    for (method, cutoff), folders in outputs.items():
        for step, folder in folders.items():
            err = relative_weight_error(folder, real[step], real[0]) if step in real else None
            rows.append(row(method, step, folder, cutoff, err, stop=real[cutoff]))
    return curve, rows


def point_adapters_at(run_dir: Path, base_dir: Path) -> None:
    """Set ``base_model_name_or_path`` of every adapter checkpoint to ``base_dir`` (absolute).

    TRL records the path the base had during training (here the temporary folder); pointing it at the
    published base lets ``AutoModelForCausalLM.from_pretrained(checkpoint)`` find it.
    """
    for config in Path(run_dir).glob("checkpoint-*/adapter_config.json"):
        doc = json.loads(config.read_text())
        doc["base_model_name_or_path"] = str(Path(base_dir).resolve())
        config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def run_lab(profile: Profile, out: Path, seed: int = 0, overwrite: bool = False, quiet: bool = False,
            lora: LoraSettings | None = None, base: Path | None = None, threads: int = 1) -> Path:
    """Run every phase of ``profile`` into ``out``; returns ``out``. Refuses an existing ``out`` unless told.

    ``lora``: GRPO trains a LoRA adapter (lr ``profile.rl.lora_lr``) instead of every weight.
    ``base``: skip pre-training and start from this model folder (another lab run's ``base/``, say).
    ``threads``: torch's CPU threads (default 1; see below).
    """
    out = Path(out)
    check_lab_out(out, overwrite, base=base)
    if base is not None and not (Path(base) / "config.json").is_file():
        raise RelexError(f"--base {base}: not a model folder (no config.json)")
    quiet_libraries(quiet)  # before transformers is imported, so that its offline switches take effect
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from relex.lab.model import build_model, count_parameters
    from relex.lab.pretrain import pretrain
    from relex.lab.rl import run_grpo
    from relex.lab.tasks import make_task
    from relex.lab.tokenizer import build_tokenizer

    # One thread by default: on a shared 2-core machine a second busy-waiting thread makes these tiny models
    # several times slower, not faster. The thread count changes float reduction order, hence the trajectory.
    torch.set_num_threads(threads)
    set_seed(seed)
    clock = _Clock()
    with building(out, overwrite=overwrite, layout=LAB_LAYOUT, what="relex lab") as tmp:
        task = make_task(profile.task, profile.digits, profile.heldout_size)
        base_dir, run_dir = tmp / "base", tmp / "run"
        with clock.phase("pretrain"):
            if base is None:
                tokenizer = build_tokenizer(task.alphabet)
                model = build_model(profile.shape, tokenizer, seed)
                pre = pretrain(model, tokenizer, task, profile.pretrain, seed, quiet)
                model.save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
                pretrained = {**asdict(profile.pretrain), "stopped_at_step": pre.steps, "val_accuracy": pre.val_accuracy,
                              "in_band": pre.in_band, "rollbacks": pre.rollbacks, "history": pre.history}
            else:
                shutil.copytree(base, base_dir)
                tokenizer = AutoTokenizer.from_pretrained(base_dir)
                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                pretrained = {"from": str(Path(base).resolve())}
        with clock.phase("rl"):
            set_seed(seed)
            policy = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
            grpo = run_grpo(policy, tokenizer, task, profile.rl, run_dir, seed, quiet, lora=lora)
            if lora is not None:
                point_adapters_at(run_dir, out / "base")
        last = profile.rl.steps
        cutoffs, curve, rows, moves = extrapolate_and_measure(tmp, task, last, profile.cutoffs, profile.curve_every,
                                                              clock, quiet)
        meta = {
            "profile": profile.name, "seed": seed, "threads": threads, "T": last, "cutoffs": cutoffs, "task": task.spec(),
            "model": {**(asdict(profile.shape) if base is None else {}), "parameters": count_parameters(model)},
            "pretrain": pretrained,
            "rl": {**asdict(profile.rl), "lr_used": profile.rl.lora_lr if lora else profile.rl.lr},
            "lora": None if lora is None else {**asdict(lora), "trainable_parameters": grpo.trainable_parameters},
            "train_reward": [{"step": h["step"], "reward": h["reward"]} for h in grpo.history if "reward" in h],
            "drift": moves, "seconds": clock.seconds, "budget": profile.budget, "notes": profile.notes,
        }
        meta["seconds"]["total"] = round(sum(clock.seconds.values()), 2)
        report.write(tmp, meta, rows, curve)
        write_verify_set(tmp / "verify.jsonl", task, seed)
    return out


def write_verify_set(path: Path, task, seed: int) -> None:
    """``relex extrapolate --verify``'s problems for this run: drawn like training problems (never held-out
    ones, which stay the test set), by a seed of their own."""
    from relex.eval.dataset import write_dataset

    rng = random.Random(f"verify:{seed}")
    problems = {p.prompt: p for p in task.sample_many(4 * VERIFY_SIZE, rng)}  # distinct prompts
    write_dataset(path, task.dataset(list(problems.values())[:VERIFY_SIZE]))
