"""Trajectory diagnostics, each next to what a random walk of the same length would give.

All come from Gram matrices (Delta_0 = 0 at step 0): rank-1 share and R^2 of the linear fit (the
paper's evidence), path efficiency ||Delta_T|| / sum ||Delta_t - Delta_{t-1}||, the growth exponent of
||Delta_t|| against t (1 for a straight drift, 0.5 for a random walk), and the drift of the top
direction between the first half of the window and the whole (cosine of the two v1).
A random walk scores a high rank-1 share and R^2 too, so those alone do not show predictability.
The window's idle steps are flagged too (``stats.updates``): a window made of them looks perfectly straight and
says nothing about the run.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from relex.analysis.backtest import MIN_PREFIX
from relex.stats.fitting import fit_line
from relex.stats.gram import TensorStats, whole_model
from relex.stats.summary import rank1_fit
from relex.stats.updates import idle_steps, idle_warning, increment_norms, update_cosines

NULL_DIM = 2048
NULL_REPEATS = 32


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
