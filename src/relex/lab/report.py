"""The lab's report: one JSON, one Markdown table (paper Tables 1 and 3 in spirit), one PNG plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from relex.jsonout import write_json  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One evaluated model: what it is, where it sits in the run, how it scored."""

    method: str  # "base", "rlvr", or an extrapolation method name
    step: int
    accuracy: float
    stderr: float
    cutoff: int | None = None
    weight_error: float | None = None
    path: str = ""
    vs_stop: float | None = None  # an extrapolation's paired accuracy difference to its cutoff checkpoint
    vs_stop_stderr: float | None = None
    outcomes: str = ""  # per held-out problem, "1" right / "0" wrong: lets any two rows be paired later


def _fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _fmt_vs_stop(r: Row) -> str:
    return "—" if r.vs_stop is None else f"{100 * r.vs_stop:+.1f} ± {100 * r.vs_stop_stderr:.1f}"


def _lora_line(lora: dict[str, Any] | None, parameters: int) -> list[str]:
    """The header line that marks a LoRA run (none for full fine-tuning)."""
    if lora is None:
        return []
    share = 100 * lora["trainable_parameters"] / parameters
    return ["", f"**LoRA run**: rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}; "
                f"{lora['trainable_parameters']:,} trainable parameters ({share:.1f}% of the model). Checkpoints "
                "hold the adapter only; they are evaluated and measured as base + merged adapter."]


def _task_name(task: dict[str, Any]) -> str:
    """``addition (3 digits)``, or for the LLM lab's math task its grader and generation budget."""
    if task["task"] == "math":
        share = task["word_share"]
        kinds = {0.0: "arithmetic", 1.0: "two-step word problems"}.get(
            share, f"arithmetic and two-step word problems ({share:.0%} word problems)")
        return f"math ({kinds}, chat template, graded by {task['grader']}, {task['max_new_tokens']} new tokens)"
    return f"{task['task']} ({task['digits']} digits)"


def markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    """Main table (one line per model) plus an observation-window x target-step table."""
    n = meta["task"]["heldout_size"]
    lines = [
        f"# relex lab — profile `{meta['profile']}`, seed {meta['seed']}",
        "",
        f"Task: {_task_name(meta['task'])}, held-out n={n}, greedy decoding. "
        f"Model: {meta['model'].get('name', 'Qwen2')}, {meta['model']['parameters']:,} parameters. "
        f"RLVR: GRPO, {meta['T']} steps "
        f"({meta['rl']['prompts_per_step']} prompts x {meta['rl']['group_size']}), lr {meta['rl']['lr_used']:g}, "
        f"beta {meta['rl']['beta']:g}.",
        *_lora_line(meta.get("lora"), meta["model"]["parameters"]),
        "",
        "Accuracy ± binomial standard error; vs stop = an extrapolation's accuracy minus that of its cutoff "
        "checkpoint, paired over the same problems (points ± paired standard error); relative weight error = "
        "||W_pred − W_real|| / ||W_real − W_0|| against the real checkpoint at the same step (— where none exists).",
        "",
        "| Method | Observed steps | Step | Accuracy (%) | vs stop | Rel. weight error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        observed = "—" if r.cutoff is None else f"1..{r.cutoff}"
        name = {"base": "Base", "rlvr": "RLVR (real)"}.get(r.method, r.method)
        lines.append(f"| {name} | {observed} | {r.step} | {100 * r.accuracy:.1f} ± {100 * r.stderr:.1f} "
                     f"| {_fmt_vs_stop(r)} | {_fmt_err(r.weight_error)} |")
    by_step = {m["step"]: m for m in meta["drift"]}
    last = meta["T"]
    lines.append("")
    for cutoff in meta["cutoffs"]:
        m = by_step[cutoff]
        if m["norm"] == 0:  # every group's rewards were equal so far: zero advantages, no update
            lines += [f"- Real run: the weights had not moved by step {cutoff} (||ΔW|| = 0)."]
            continue
        lines += [f"- Real run from step {cutoff} to {last}: ||ΔW|| grew {by_step[last]['norm'] / m['norm']:.2f}x "
                      f"(a line predicts {last / cutoff:.2f}x); cos(ΔW_{cutoff}, ΔW_{last}) = {m['cos_with_last']:.3f}."]
    extrap = [r for r in rows if r.cutoff is not None and r.method != "rlvr"]
    steps = sorted({r.step for r in extrap})
    if extrap:
        lines += ["", "Accuracy (%) by observation window and target step:", "",
                  "| Method | T_cut | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for method, cutoff in dict.fromkeys((r.method, r.cutoff) for r in extrap):
            cells = {r.step: f"{100 * r.accuracy:.1f}" for r in extrap if (r.method, r.cutoff) == (method, cutoff)}
            lines.append(f"| {method} | {cutoff} | " + " | ".join(cells.get(s, "—") for s in steps) + " |")
        reference = {r.step: r for r in rows if r.method in ("base", "rlvr")}
        lines.append("| RLVR (real) | — | " + " | ".join(
            f"{100 * reference[s].accuracy:.1f}" if s in reference else "—" for s in steps) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, curve: list[Row], rows: list[Row], title: str) -> None:
    """Accuracy against step for the real run, with extrapolated models as markers."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    xs = [r.step for r in curve]
    ys = [100 * r.accuracy for r in curve]
    es = [100 * r.stderr for r in curve]
    ax.plot(xs, ys, color="black", lw=1.2, label="RLVR (real)")
    ax.axhline(ys[0], color="gray", ls="--", lw=0.8, label="base")
    ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], color="black", alpha=0.12)
    cutoffs = sorted({r.cutoff for r in rows if r.cutoff is not None})
    methods = list(dict.fromkeys(r.method for r in rows if r.cutoff is not None and r.method != "rlvr"))
    markers, colors = "os^Dv", plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_series, nudge = len(methods) * len(cutoffs), 0.006 * max(xs[-1], 1)
    for mi, method in enumerate(methods):
        for ci, cutoff in enumerate(cutoffs):
            pts = [r for r in rows if r.method == method and r.cutoff == cutoff]
            shift = (mi * len(cutoffs) + ci - (n_series - 1) / 2) * nudge  # side by side, not on top
            ax.errorbar([r.step + shift for r in pts], [100 * r.accuracy for r in pts], [100 * r.stderr for r in pts],
                        fmt=markers[mi % len(markers)], color=colors[ci % len(colors)], capsize=3, ms=6,
                        mfc="none" if mi else None, label=f"{method}, T_cut={cutoff}")
    for ci, cutoff in enumerate(cutoffs):
        ax.axvline(cutoff, color=colors[ci % len(colors)], ls=":", lw=1)
    ax.set_xlabel("RLVR step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out_dir: Path, meta: dict[str, Any], rows: list[Row], curve: list[Row]) -> None:
    """``report.json``, ``report.md`` and ``accuracy.png`` in ``out_dir``."""
    doc = {**meta, "rows": [asdict(r) for r in rows], "curve": [asdict(r) for r in curve]}
    write_json(out_dir / "report.json", doc)
    (out_dir / "report.md").write_text(markdown(meta, rows))
    plot(out_dir / "accuracy.png", curve, rows,
         f"relex lab ({meta['model']['name']}, {meta['profile']}): math" if meta["task"]["task"] == "math" else
         f"relex lab ({meta['profile']}): {meta['task']['task']}, {meta['task']['digits']} digits")


def rl_gain(report: dict[str, Any], until: int | None = None) -> float:
    """The RL run's best held-out gain over the base (up to step ``until``), in combined standard errors.

    The lab tests assert it; ``benchmarks/lab_spread.py`` measures its spread across CPUs and seeds.
    """
    base = report["curve"][0]
    steps = [r for r in report["curve"] if 0 < r["step"] <= (until or report["T"])]
    return max((r["accuracy"] - base["accuracy"]) / math.hypot(r["stderr"], base["stderr"]) for r in steps)


def early_gain(report: dict[str, Any]) -> float:
    """``rl_gain`` in the first third of the run, where the lab's cutoffs are."""
    return rl_gain(report, report["T"] // 3)
