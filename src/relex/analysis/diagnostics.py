"""Trajectory diagnostics, each next to what a random walk of the same length would give.

All come from Gram matrices (Delta_0 = 0 at step 0): rank-1 share and R^2 of the linear fit (the
paper's evidence), path efficiency ||Delta_T|| / sum ||Delta_t - Delta_{t-1}||, the growth exponent of
||Delta_t|| against t (1 for a straight drift, 0.5 for a random walk), and the drift of the top
direction between the first half of the window and the whole (cosine of the two v1).
A random walk scores a high rank-1 share and R^2 too, so those alone do not show predictability.
The window's idle steps are flagged too: a checkpoint equal to the one before (no update), or an update
that repeats the previous one's direction at a shrinking size (an optimizer coasting on its momentum with
little or no gradient, as GRPO does when every completion of every group earns the same reward). A window made
of such steps looks perfectly straight and says nothing about the run.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from relex.analysis.backtest import MIN_PREFIX
from relex.analysis.metrics import rank1_fit
from relex.stats.fitting import fit_line
from relex.stats.gram import TensorStats

NULL_DIM = 2048
NULL_REPEATS = 32
STALL_FRACTION = 1e-6  # an update this small next to the window's largest counts as none
COAST_COSINE = 0.99  # measured on a GRPO run: gradient steps 0.52-0.89, zero-reward steps 0.9992-0.99997
COAST_SHRINK = 0.98  # ... and a coasting optimizer's steps shrink (Adam's by about beta1 / sqrt(beta2))


def increment_norms(stats: TensorStats) -> np.ndarray:
    """||Delta_t - Delta_{t-1}|| for each observed step, with Delta_0 = 0."""
    g = stats.gram
    diag = np.diag(g)
    prev = np.concatenate([[0.0], diag[:-1]])
    cross = np.concatenate([[0.0], np.diag(g, -1)])
    return np.sqrt(np.clip(diag - 2 * cross + prev, 0.0, None))


def update_cosines(stats: TensorStats) -> np.ndarray:
    """cos(Delta_t - Delta_{t-1}, Delta_{t-1} - Delta_{t-2}) for each observed step (nan for the first, or
    where either update is zero), with Delta_0 = 0."""
    g = np.pad(stats.gram, ((1, 0), (1, 0)))  # index 0 is step 0, where Delta = 0
    t = np.arange(2, len(g))
    dot = g[t, t - 1] - g[t - 1, t - 1] - g[t, t - 2] + g[t - 1, t - 2]
    norms = increment_norms(stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (norms[1:] * norms[:-1])
    return np.concatenate([[np.nan], np.clip(cos, -1.0, 1.0)])


def idle_steps(stats: TensorStats) -> dict[str, list[int]]:
    """Steps of the window that carry no new gradient: ``stalled`` (the checkpoint equals the one before)
    and ``coasting`` (the update repeats the previous one's direction, smaller per step)."""
    gaps = np.diff(np.concatenate([[0.0], stats.steps]))
    norms = increment_norms(stats)
    per_step = norms / gaps
    stalled = norms <= STALL_FRACTION * norms.max(initial=0.0)
    cos = update_cosines(stats)
    shrinking = np.concatenate([[False], per_step[1:] < COAST_SHRINK * per_step[:-1]])
    coasting = ~stalled & (np.nan_to_num(cos) >= COAST_COSINE) & shrinking
    return {"stalled": [int(s) for s in stats.steps[stalled]], "coasting": [int(s) for s in stats.steps[coasting]]}


def path_efficiency(stats: TensorStats) -> float:
    path = increment_norms(stats).sum()
    return float(stats.delta_norms[-1] / path) if path > 0 else float("nan")


def growth_exponent(stats: TensorStats) -> float:
    """Slope of log ||Delta_t|| against log t: 1 for linear growth, 0.5 for a random walk."""
    norms = stats.delta_norms
    ok = norms > 0
    if ok.sum() < 2:
        return float("nan")
    return fit_line(np.log(stats.steps[ok]), np.log(norms[ok]))[0]


def direction_drift(stats: TensorStats) -> float:
    """|cos| between v1 of the first half of the window and v1 of the whole window."""
    half = max(2, (len(stats.steps) + 1) // 2)
    if half >= len(stats.steps):
        return float("nan")
    values, vectors = stats.spectrum()
    h_values, h_vectors = TensorStats(stats.steps[:half], stats.gram[:half, :half]).spectrum()
    if values[0] <= 0 or h_values[0] <= 0:
        return float("nan")
    cross = h_vectors[:, 0] @ stats.gram[:half, :] @ vectors[:, 0]
    return float(abs(cross) / np.sqrt(values[0] * h_values[0]))


def tensor_diagnostics(stats: TensorStats) -> dict[str, float]:
    fit = rank1_fit(stats)
    return {"rank1_share": fit.share, "r2_linear": fit.r2, "path_efficiency": path_efficiency(stats),
            "growth_exponent": growth_exponent(stats), "direction_drift_cos": direction_drift(stats)}


def random_walk_stats(steps: np.ndarray, dim: int, rng: np.random.Generator) -> TensorStats:
    """Gram statistics of a Gaussian random walk observed at ``steps`` (one unit step per step)."""
    gaps = np.diff(np.concatenate([[0.0], steps]))
    walk = np.cumsum(rng.standard_normal((len(steps), dim)) * np.sqrt(gaps)[:, None], axis=0)
    return TensorStats(np.asarray(steps, dtype=np.float64), walk @ walk.T)


def random_walk_null(steps: np.ndarray, dim: int = NULL_DIM, repeats: int = NULL_REPEATS,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of every diagnostic over simulated random walks."""
    rng = np.random.default_rng(seed)
    samples = [tensor_diagnostics(random_walk_stats(steps, dim, rng)) for _ in range(repeats)]
    columns = {k: [s[k] for s in samples] for k in samples[0]}
    return {k: {"mean": _over_defined(np.mean, v), "std": _over_defined(np.std, v)} for k, v in columns.items()}


def _over_defined(reduce: Callable[[np.ndarray], Any], values: list[float]) -> float:
    """``reduce`` over the values that are not nan; nan when none is (a window too short for that diagnostic)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(reduce(x)) if len(x) else float("nan")


def whole_model(stats: dict[str, TensorStats]) -> TensorStats:
    """The statistics of all tensors as one vector: the sum of their Gram matrices."""
    return TensorStats(next(iter(stats.values())).steps, sum(s.gram for s in stats.values()))


def diagnose(stats: dict[str, TensorStats]) -> dict:
    """Median per-tensor diagnostics, whole-model growth and update norms, and the random-walk null."""
    moving = {n: s for n, s in stats.items() if s.delta_norms[-1] > 0}
    per_tensor = {n: tensor_diagnostics(s) for n, s in moving.items()}
    keys = ["rank1_share", "r2_linear", "path_efficiency", "growth_exponent", "direction_drift_cos"]
    medians = {k: _over_defined(np.median, [d[k] for d in per_tensor.values()]) for k in keys}
    steps = next(iter(stats.values())).steps
    whole = whole_model(stats)
    gaps = np.diff(np.concatenate([[0.0], steps]))
    return {
        "steps": [int(s) for s in steps],
        "median": medians,
        "whole_model": {"path_efficiency": path_efficiency(whole), "growth_exponent": growth_exponent(whole),
                        "delta_norms": whole.delta_norms.tolist(),
                        "update_norm_per_step": (increment_norms(whole) / gaps).tolist(),
                        "update_cosine": [None if np.isnan(c) else float(c) for c in update_cosines(whole)]},
        "idle": idle_steps(whole),
        "random_walk": random_walk_null(steps),
        "per_tensor": per_tensor,
    }


def wander_limit(null_eff: float) -> float:
    """Path efficiency below which a run counts as a random walk: twice the walk's, but never above the
    midpoint between the walk's and a straight line's (with few checkpoints a walk's is already >= 0.5)."""
    return min(2 * null_eff, (1 + null_eff) / 2)


def verdict(diag: dict, safe_horizon: float | None, setting: str | None = None, space: str = "weight") -> str:
    """One line: growth, straightness and fit against a random walk, and how far the backtest goes.

    ``safe_horizon`` None means the backtest did not run (too few checkpoints), not that it failed.
    ``space`` says what the safe horizon rests on: "weight" (Gram errors only, said so plainly) or
    "function" (the probe backtest: the prediction's outputs beat stopping's beyond the probe's noise).
    """
    med, null = diag["median"], diag["random_walk"]
    growth = diag["whole_model"]["growth_exponent"]
    shape = ("grows at a rate the window cannot measure (fewer than two checkpoints moved)" if math.isnan(growth)
             else ("grows linearly" if 0.85 <= growth <= 1.15 else "grows sub-linearly" if growth < 0.85
                   else "grows super-linearly") + f" (like t^{growth:.2f})")
    eff, null_eff = med["path_efficiency"], null["path_efficiency"]["mean"]
    path = (f"wanders like a random walk (path efficiency {eff:.2f} vs {null_eff:.2f})" if eff < wander_limit(null_eff)
            else f"moves {'straight' if eff > 0.8 else 'with detours'} (path efficiency {eff:.2f}, random walk {null_eff:.2f})")
    r2_z = (med["r2_linear"] - null["r2_linear"]["mean"]) / max(null["r2_linear"]["std"], 1e-12)
    fit = (f"its rank-1 coefficient fits a line {'better' if r2_z > 3 else 'no better'} than a random walk's "
           f"(R^2 {med['r2_linear']:.3f} vs {null['r2_linear']['mean']:.3f})")
    drift = med["direction_drift_cos"]
    turn = ("its top direction cannot be compared within so short a window" if math.isnan(drift) else
            f"its top direction {'holds' if drift > 0.95 else 'turns'} (cos {drift:.2f}, first half vs whole window)")
    horizon = (f"too few checkpoints to backtest ({len(diag['steps'])}; it needs {2 * MIN_PREFIX})"
               if safe_horizon is None else "the backtest supports no extrapolation" if safe_horizon <= 1
               else f"the backtest supports up to {safe_horizon:g}x the cutoff" + (f" ({setting})" if setting else ""))
    if safe_horizon is not None:
        horizon += (" in function space (the probe's outputs)" if space == "function" else
                    " in weight space only (no probe: pass --probe FILE to check the model's outputs)")
        if safe_horizon > 1:  # measured: a run past its peak is tracked down with it
            horizon += (": such predictions stayed closer to the run's later checkpoints than the cutoff did, "
                        "which is not scoring better than the cutoff if the run itself gets worse")
    idle = idle_warning(diag["idle"], len(diag["steps"]))
    return f"The run {shape}, {path}; {fit}; {turn}; {horizon}." + (f" Warning: {idle}" if idle else "")


def idle_warning(idle: dict[str, list[int]], n_steps: int) -> str:
    """A sentence on a window's idle steps (``idle_steps``; empty when every step moved on a gradient of its own)."""
    stalled, coasting = idle["stalled"], idle["coasting"]
    if not stalled and not coasting:
        return ""
    parts = []
    if stalled:
        parts.append(f"checkpoint{'s' * (len(stalled) > 1)} {_steps(stalled)} did not move from the one before "
                     "(no update: e.g. every completion of every group got the same reward)")
    if coasting:
        many = len(coasting) > 1
        parts.append(f"the update{'s' * many} at step{'s' * many} {_steps(coasting)} repeat{'' if many else 's'} the "
                     f"direction before at a smaller size (cos >= {COAST_COSINE}), as an optimizer coasting on its "
                     "momentum with little or no gradient does")
    live = n_steps - len(stalled) - len(coasting)
    own = f"{live} update{'s' * (live != 1)} with a gradient of {'their' if live != 1 else 'its'} own"
    meaning = "; its straightness says nothing about the run." if live < 3 else "."
    return f"{'; '.join(parts)}. The window holds {own}{meaning}"


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:-1])) + (" and " if len(steps) > 1 else "") + str(steps[-1])


def quantized_warning(check: dict) -> str:
    """One line for a run whose deltas look quantized (``trajectory.precision.quantized_deltas``), naming the cause."""
    sixteen = any(d in ("bfloat16", "float16") for d in check["stored"])
    cause = ("its checkpoints hold 16-bit weights: weights kept in 16 bits during training cannot move by less than "
             "half an ulp, and a 16-bit export of fp32 masters (verl's model_merger, OpenRLHF's _hf folders) rounds "
             "the same way; read the fp32 weights if the trainer saved them (verl: the FSDP shards in "
             "global_step_N/actor/, see docs/trainers.md)" if sixteen else
             "its checkpoints hold values on a 16-bit grid though saved as "
             f"{'/'.join(check['stored']) or 'floats'} (a 16-bit model or export cast up on save)")
    return (f"the deltas look quantized: in {check['quantized']} of {check['sampled']} sampled tensors, step "
            f"{check['step']} minus the base is mostly exact zeros, a few distinct values or moves of one ulp (median "
            f"{check['zero_share']:.0%} zeros); {cause}. Fits to these deltas fit rounding, not training")
