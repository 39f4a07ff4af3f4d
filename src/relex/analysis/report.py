"""``relex report``: one Markdown page with the run's diagnostics, backtest and plots (paper Figs. 2-6).

Everything comes from the Gram statistics (computed once, cached): the analysis that ``relex analyze``
shows (``analysis.overview.analyze_run``: diagnostics, backtest, choice, safe horizon, verdict and, when the
run folder has checkpoints after the cutoff, RELEX's alignment with them), rendered as Markdown, plus the
coefficient trajectories with their fits and the rank-k explained variance. Accuracy by step is plotted from a scores file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from relex.analysis import plots
from relex.analysis.overview import analyze_run
from relex.errors import RelexError
from relex.jsonout import write_json
from relex.stats.fitting import fit_line, r_squared
from relex.stats.gram import TensorStats
from relex.tempfiles import building, check_replaceable

MAX_RANK_SHOWN = 5
REPORT_LAYOUT = ("report.json", "report.md", "*.png")  # what a report folder holds; report.json always
SCORES_SHAPE = '{"real": {"STEP": accuracy, ...}, ...}'


def coefficient_curve(name: str, full: TensorStats, observed: list[int]) -> dict:
    """c_1 over the observed steps and, when later steps are in ``full``, their projections on v1."""
    obs = full.subset(observed)
    values, vectors = obs.spectrum()
    sigma = np.sqrt(values[0])
    coeff = sigma * vectors[:, 0]
    slope, intercept = fit_line(obs.steps, coeff)
    index = {int(s): i for i, s in enumerate(full.steps)}
    rows = [index[s] for s in observed]
    later = [int(s) for s in full.steps if s > observed[-1]]
    # <Delta_s, v1> = u1^T G[obs, s] / sigma_1
    later_coeff = [float(vectors[:, 0] @ full.gram[rows, index[s]] / sigma) for s in later]
    last = later[-1] if later else observed[-1] * 2
    return {"name": name, "steps": observed, "coefficients": coeff.tolist(), "slope": slope, "intercept": intercept,
            "r2": r_squared(obs.steps, coeff), "later_steps": later, "later_coefficients": later_coeff,
            "line_steps": [0, last]}


def representative(stats: dict[str, TensorStats], diag: dict, count: int = 4) -> list[str]:
    """Tensors at the best, median and worst R^2, plus the one that moved most."""
    per = diag["per_tensor"]
    ranked = sorted((n for n in per if np.isfinite(per[n]["r2_linear"])), key=lambda n: per[n]["r2_linear"])
    if not ranked:
        return []
    biggest = max(ranked, key=lambda n: stats[n].delta_norms[-1])
    picks = [ranked[-1], ranked[len(ranked) // 2], ranked[0], biggest]
    return list(dict.fromkeys(picks))[:count]


def write_report(stats: dict[str, TensorStats], observed: list[int], out_dir: Path,
                 scores: dict[str, dict[str, float]] | None = None, probe_rows: list[dict] | None = None,
                 overwrite: bool = True) -> Path:
    """Write ``report.md``, ``report.json`` and PNGs into ``out_dir``; returns the Markdown path.

    The folder is built under a hidden temporary name and published when complete; an existing one is
    replaced only with ``overwrite`` and only if it is a previous report (``check_out``).
    ``probe_rows`` (the function-space backtest of the window) make the choice and safe horizon function-space.
    """
    final = Path(out_dir)
    try:
        with building(final, overwrite=overwrite, layout=REPORT_LAYOUT, what="relex report") as tmp:
            _write_into(stats, observed, tmp, scores, probe_rows)
    except OSError as exc:
        raise RelexError(f"{final}: cannot write the report ({exc.strerror or exc})") from None
    return final / "report.md"


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse ``--out`` before any work: an existing one without ``overwrite``, and one that is not a
    previous report (a run, a lab, a home folder ...), which a report must never replace."""
    check_replaceable(out, overwrite, REPORT_LAYOUT, "relex report")


def check_scores(scores: Any, path: Path) -> dict[str, dict[str, float]]:
    """``scores`` (the parsed ``--scores`` file at ``path``) if it has the shape the accuracy plot reads,
    else a RelexError naming the file, the shape expected and the first thing that differs."""
    problem = _scores_problem(scores)
    if problem:
        raise RelexError(f"{path}: expected accuracy by step for each series, {SCORES_SHAPE}; {problem}")
    return scores


def _scores_problem(scores: Any) -> str | None:
    """What keeps ``scores`` from being ``{series: {step: accuracy}}``, or None."""
    if not isinstance(scores, dict):
        return f"the top level is {_json_kind(scores)}"
    for label, series in scores.items():
        if not isinstance(series, dict):
            return f'"{label}" is {_json_kind(series)}'
        if not series:
            return f'"{label}" has no steps'
        for step, value in series.items():
            try:
                int(step)
            except ValueError:
                return f'step "{step}" of "{label}" is not an integer'
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f'the score of step {step} of "{label}" is not a finite number'
    return None


def _json_kind(value: Any) -> str:
    """A JSON value's kind, as a person names it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "null")


def _write_into(stats: dict[str, TensorStats], observed: list[int], out_dir: Path,
                scores: dict[str, dict[str, float]] | None, probe_rows: list[dict] | None) -> None:
    """The report's files, written into ``out_dir``."""
    analysis = analyze_run(stats, observed, probe_rows=probe_rows)
    obs_stats = {n: s.subset(observed) for n, s in stats.items()}
    diag, rows, align = analysis["diagnostics"], analysis["backtest"], analysis["alignment"]
    label, safe = analysis["chosen"], analysis["safe_horizon"]

    moving = [s for s in obs_stats.values() if s.delta_norms[-1] > 0]
    spectra = [np.cumsum(s.spectrum()[0]) / s.spectrum()[0].sum() for s in moving]
    ranks = min(MAX_RANK_SHOWN, len(observed))
    cumulative = [float(np.median([sp[k] for sp in spectra])) for k in range(ranks)] if spectra else []

    curves = [coefficient_curve(n, stats[n], observed) for n in representative(obs_stats, diag)]
    plots.plot_coefficients(curves, out_dir / "coefficients.png")
    plots.plot_explained_variance(cumulative, out_dir / "explained_variance.png")
    figures = [("Rank-1 coefficients and linear fits", "coefficients.png"),
               ("Explained variance by rank", "explained_variance.png")]
    if rows:
        plots.plot_backtest(rows, out_dir / "backtest.png")
        figures.append(("Backtest error against horizon", "backtest.png"))
    if align:
        plots.plot_alignment(align, out_dir / "alignment.png")
        figures.append(("Alignment with real later checkpoints", "alignment.png"))
    if scores:
        plots.plot_accuracy(scores, observed[-1], out_dir / "accuracy.png")
        figures.append(("Accuracy by step", "accuracy.png"))

    lines = ["# relex report", "", f"Observed steps: {observed[0]}..{observed[-1]} ({len(observed)} checkpoints); "
             f"{len(stats)} tensors.", "", f"**Verdict.** {analysis['verdict']}", "",
             "## Diagnostics against a random walk", "", "| diagnostic | this run | random walk |", "|---|---:|---:|"]
    for key, value in diag["median"].items():
        null = diag["random_walk"][key]
        lines.append(f"| {key.replace('_', ' ')} | {value:.4f} | {null['mean']:.4f} ± {null['std']:.4f} |")
    lines.append(f"| growth exponent (whole model) | {diag['whole_model']['growth_exponent']:.4f} | 0.5 |")
    lines += ["", "Rank-k explained variance (median cumulative): "
              + ", ".join(f"k={k + 1}: {v:.4f}" for k, v in enumerate(cumulative)), ""]
    if rows:
        lines += ["## Backtest", "", f"Setting supported furthest: **{label}**, safe horizon {safe:g}x "
                  f"({analysis['space']} space).", "",
                  "| setting | horizon | relative error | error / stopping | cosine | norm ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['setting']} | {r['horizon']:g} | {r['relative_error']:.4f} | {r['error_vs_stay']:.3f} | "
                  f"{r['cosine']:.4f} | {r['norm_ratio']:.3f} |" for r in rows]
        lines.append("")
    if probe_rows:
        lines += ["## Function-space backtest (probe)", "", "Mean token KL(real || predicted) of the last observed "
                  "checkpoint on the probe prompts, teacher-forced on the real model's greedy continuations; safe: "
                  "below stopping's by more than the margin.", "",
                  "| setting | horizon | KL | KL / stopping | agreement | agreement of stopping | safe |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['setting']} | {r['horizon']:g} | {r['kl']:.4f} | {r['kl_vs_stay']:.3f} | {r['agreement']:.3f} | "
                  f"{r['agreement_stop']:.3f} | {'yes' if r['safe'] else 'no'} |" for r in probe_rows]
        lines.append("")
    if align:
        lines += ["## RELEX against real later checkpoints", "", "| step | mean cosine | mean norm ratio | "
                  "relative error |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['mean_cosine']:.4f} | {r['mean_norm_ratio']:.3f} | {r['relative_error']:.4f} |"
                  for r in align]
        lines.append("")
    lines += ["## Figures", ""] + [f"### {title}\n\n![{title}]({file})\n" for title, file in figures]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out_dir / "report.json", {**analysis, "explained_variance_cumulative": cumulative,
                                         "coefficients": curves})
