"""Predict-extend (the NExt paper's loop): alternate W real GRPO steps with a K-step extrapolation.

Round 1 observes a finished lab run's checkpoints 1..W (base = the lab's base) and extrapolates them
to step W+K: a full model M_1. Round r > 1 continues GRPO from M_{r-1} for W steps (the lab profile's
RL config, a fresh LoRA adapter if the lab run was LoRA, another data seed so the prompts differ),
then extrapolates that window K steps ahead: M_r. After round r, r*W real steps were spent and M_r
stands for step r*(W+K). Each M_r is scored on the held-out set and compared with the lab run's own
curve: "steps saved at equal accuracy" = the first real step of the plain run whose accuracy reaches
M_r's, minus r*W (negative: the loop cost steps; none: the plain run never got there).

Output (``out/``, built under a hidden temporary sibling and published only when complete, by
``relex.tempfiles.building``; an existing output is replaced only with ``overwrite`` and only if it is one of these)::

    round-1/extrapolated/step-{W+K}/     M_1 (from the lab run's checkpoints 1..W)
    round-r/run/checkpoint-N/            round r's GRPO steps from M_{r-1} (r > 1)
    round-r/extrapolated/step-{W+K}/     M_r
    report.json  report.md
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relex.errors import RelexError
from relex.jsonout import write_json
from relex.materialize import extrapolate
from relex.methods import METHODS
from relex.methods.base import Method
from relex.tempfiles import building, check_replaceable, refuse_overlap

if TYPE_CHECKING:
    from relex.lab.tasks import Task

LAYOUT = ("report.json", "report.md", "round-*")
ROUND_SEED_STRIDE = 1000  # round r trains with seed + (r - 1) * stride: prompts and sampling differ per round


def build_method(name: str, cutoff: int) -> Method:
    """``METHODS[name]`` with default parameters and ``cutoff`` when its constructor takes one.

    A method without a ``cutoff`` parameter still sees only the window: the trajectory it is fitted
    on holds checkpoints 1..cutoff and nothing else.
    """
    if name not in METHODS:
        raise RelexError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    try:
        takes_cutoff = "cutoff" in inspect.signature(cls).parameters
        return cls(cutoff=cutoff) if takes_cutoff else cls()
    except TypeError as exc:
        raise RelexError(f"method {name!r} cannot be built with its default parameters ({exc})") from None


def _lab_report(lab_dir: Path) -> dict[str, Any]:
    """The lab run's report.json, checked for what the loop needs."""
    path = lab_dir / "report.json"
    if not path.is_file():
        raise RelexError(f"{lab_dir}: not a lab output folder (no report.json); run `relex lab` first")
    try:
        report = json.loads(path.read_text())
    except ValueError as exc:
        raise RelexError(f"{path}: invalid JSON ({exc})") from None
    for key in ("profile", "seed", "T", "task", "curve"):
        if key not in report:
            raise RelexError(f"{path}: no '{key}' entry; re-run `relex lab` with this version")
    from relex.lab.profiles import PROFILES

    if report["profile"] not in PROFILES:
        raise RelexError(f"{path}: unknown lab profile {report['profile']!r}")
    for sub in ("base", "run"):
        if not (lab_dir / sub).is_dir():
            raise RelexError(f"{lab_dir}: no {sub}/ folder")
    return report


def first_step_reaching(curve: dict[int, float], accuracy: float) -> int | None:
    """The smallest step of ``curve`` (step -> accuracy) whose accuracy is >= ``accuracy``, else None."""
    return next((s for s in sorted(curve) if curve[s] >= accuracy), None)


def steps_to_refine(curve: dict[int, float], accuracy: float, last_step: int) -> list[int]:
    """The unscored steps between the scored curve's first crossing of ``accuracy`` and the scored step before it.

    The lab scores its run every ``curve_every`` steps; scoring the steps of that one interval makes the
    crossing exact to the step within it (earlier intervals, whose scored ends stay below, are not searched:
    that would take every checkpoint of the run). None if the scored curve never reaches ``accuracy``.
    """
    first = first_step_reaching(curve, accuracy)
    if first is None:
        return []
    previous = max((s for s in curve if s < first), default=0)
    return [s for s in range(previous + 1, min(first, last_step + 1)) if s not in curve]


def run_predict_extend(lab_dir: Path, method: str, window: int, horizon: int, rounds: int, out: Path,
                       overwrite: bool = False, quiet: bool = False) -> Path:
    """Run ``rounds`` rounds of predict-extend from the lab output ``lab_dir`` into ``out``; returns ``out``."""
    lab_dir, out = Path(lab_dir), Path(out)
    refuse_overlap(out, lab_dir=lab_dir)
    check_replaceable(out, overwrite, LAYOUT, "relex predict-extend")
    if window < 2 or horizon < 1 or rounds < 1:
        raise RelexError(f"--window {window} must be >= 2, --horizon {horizon} >= 1 and --rounds {rounds} >= 1")
    lab = _lab_report(lab_dir)
    if window > lab["T"]:
        raise RelexError(f"--window {window} is beyond the lab run's last step {lab['T']}")
    build_method(method, window)  # refuse an unknown or unbuildable method before any work

    from relex.lab.lab import point_adapters_at, quiet_libraries

    quiet_libraries(quiet)  # before transformers is imported, so that its offline switches take effect
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from relex import Trajectory
    from relex.lab.evaluate import score_dirs
    from relex.lab.profiles import PROFILES, LoraSettings
    from relex.lab.rl import run_grpo
    from relex.lab.tasks import make_task

    torch.set_num_threads(1)  # as in the lab: seeded runs repeat exactly, and a shared 2-core machine stays fast
    profile = PROFILES[lab["profile"]]
    spec = lab["task"]
    task = make_task(spec["task"], spec["digits"], spec["heldout_size"], spec["heldout_seed"])
    lab_lora = lab.get("lora")
    lora = LoraSettings(lab_lora["rank"], lab_lora["alpha"], tuple(lab_lora["targets"])) if lab_lora else None
    rl = replace(profile.rl, steps=window)
    target = window + horizon
    start = time.perf_counter()
    with building(out, overwrite=overwrite, layout=LAYOUT, what="relex predict-extend") as tmp:
        results: list[dict[str, Any]] = []
        base, run = lab_dir / "base", lab_dir / "run"
        for r in tqdm(range(1, rounds + 1), desc="predict-extend", disable=quiet, leave=False):
            round_dir = tmp / f"round-{r}"
            seed = lab["seed"] + (r - 1) * ROUND_SEED_STRIDE
            if r > 1:
                set_seed(seed)
                policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
                run = round_dir / "run"
                run_grpo(policy, AutoTokenizer.from_pretrained(base), task, rl, run, seed, quiet, lora=lora)
                if lora is not None:
                    point_adapters_at(run, out / base.relative_to(tmp))
            observed = Trajectory.discover(base, run).observed(window)
            fitted = build_method(method, window).fit(observed, progress=not quiet)
            (model,) = extrapolate(fitted, round_dir / "extrapolated", targets=[target], cache=False,
                                   progress=not quiet)
            last_real = run / f"checkpoint-{window}"
            scores = score_dirs([model, last_real], task, tokenizer_dir=base, quiet=quiet, desc=f"eval round {r}",
                                adapter_base=base)
            results.append({
                "round": r, "seed": seed, "real_steps": r * window, "effective_step": r * target,
                "observed": {"base": _where(base, lab_dir, tmp), "run": _where(run, lab_dir, tmp), "steps": [1, window]},
                "model": str(model.relative_to(tmp)), "accuracy": scores[model].accuracy,
                "stderr": scores[model].stderr, "method_params": fitted.params(),
                "last_real": {"path": _where(last_real, lab_dir, tmp), "accuracy": scores[last_real].accuracy,
                              "stderr": scores[last_real].stderr},
            })
            base = model
        curve = _plain_curve(lab, lab_dir, task, results, quiet)
        accuracy = {s: c["accuracy"] for s, c in curve.items()}
        for res in results:
            first = first_step_reaching(accuracy, res["accuracy"])
            res["plain_first_step_reaching"] = first
            res["steps_saved"] = None if first is None else first - res["real_steps"]
            res["plain_at_real_steps"] = curve.get(res["real_steps"])
            res["plain_at_effective_step"] = curve.get(res["effective_step"])
        doc = {
            "lab_dir": str(lab_dir.resolve()), "profile": lab["profile"], "T": lab["T"], "task": spec,
            "lora": lab.get("lora"), "method": method, "window": window, "horizon": horizon, "rounds": rounds,
            "rl": {**asdict(rl), "lr_used": rl.lora_lr if lora else rl.lr}, "results": results,
            "plain_curve": [{"step": s, **c} for s, c in sorted(curve.items())],
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json(tmp / "report.json", doc)
        (tmp / "report.md").write_text(markdown(doc))
    return out


def _where(path: Path, lab_dir: Path, tmp: Path) -> str:
    """A path as the report names it: ``lab:run/checkpoint-4`` in the lab folder, else relative to the output."""
    return f"lab:{path.relative_to(lab_dir)}" if path.is_relative_to(lab_dir) else str(path.relative_to(tmp))


def _plain_curve(lab: dict[str, Any], lab_dir: Path, task: Task, results: list[dict[str, Any]],
                 quiet: bool) -> dict[int, dict[str, float]]:
    """The lab run's accuracy by step: its report's curve plus the checkpoints the comparison needs.

    Those are the real-step and effective-step counterparts of every round (where the run has them) and
    every step that could hold an earlier first crossing of a round's accuracy (``steps_to_refine``).
    """
    from relex.lab.evaluate import score_dirs

    curve = {int(c["step"]): {"accuracy": c["accuracy"], "stderr": c["stderr"]} for c in lab["curve"]}
    last = lab["T"]
    wanted = {s for res in results for s in (res["real_steps"], res["effective_step"]) if s <= last} - set(curve)
    for res in results:
        wanted |= set(steps_to_refine({s: c["accuracy"] for s, c in curve.items()}, res["accuracy"], last))
    if wanted:
        dirs = {lab_dir / "run" / f"checkpoint-{s}": s for s in sorted(wanted)}
        scores = score_dirs(list(dirs), task, tokenizer_dir=lab_dir / "base", quiet=quiet, desc="eval plain run",
                            adapter_base=lab_dir / "base")
        curve.update({dirs[d]: {"accuracy": sc.accuracy, "stderr": sc.stderr} for d, sc in scores.items()})
    return curve


def _pct(cell: dict[str, float] | None) -> str:
    return "—" if cell is None else f"{100 * cell['accuracy']:.1f} ± {100 * cell['stderr']:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    """One line per round: steps spent, accuracy of M_r and of the plain run, steps saved at equal accuracy."""
    w, k = doc["window"], doc["horizon"]
    kind = (f"LoRA run (rank {doc['lora']['rank']}, alpha {doc['lora']['alpha']:g})" if doc.get("lora")
            else "full fine-tuning run")
    lines = [
        f"# relex predict-extend — method `{doc['method']}`, W={w}, K={k}, {doc['rounds']} round(s)",
        "",
        f"Lab run: profile `{doc['profile']}` ({kind}, T={doc['T']}), {doc['lab_dir']}. Each round observes W real "
        f"GRPO steps (round 1: the lab run's steps 1..{w}; round r > 1: GRPO from M_(r-1), lr {doc['rl']['lr_used']:g}) "
        f"and extrapolates them K steps ahead to M_r. Held-out n={doc['task']['heldout_size']}, greedy; "
        "accuracy (%) ± binomial standard error.",
        "",
        "Steps saved at equal accuracy = first step of the plain run whose accuracy ≥ M_r's − real steps spent "
        "(negative: the loop spent more real steps than the plain run needed).",
        "",
        "| Round | Real steps spent | Effective step | M_r | Round's last real checkpoint | Plain run at real steps "
        "| Plain run at effective step | First plain step ≥ M_r | Steps saved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in doc["results"]:
        first = res["plain_first_step_reaching"]
        saved = "not reached" if res["steps_saved"] is None else f"{res['steps_saved']:+d}"
        lines.append(f"| {res['round']} | {res['real_steps']} | {res['effective_step']} | {_pct(res)} "
                     f"| {_pct(res['last_real'])} | {_pct(res['plain_at_real_steps'])} "
                     f"| {_pct(res['plain_at_effective_step'])} | {'—' if first is None else first} | {saved} |")
    return "\n".join(lines) + "\n"
