"""Per-tensor trajectory metrics from Gram statistics, their summary over a model, and the closed-form
error of any weighted-sum prediction (shared by the backtest, alignment and diagnostics)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

from relex.stats.fitting import fit_line, r_squared
from relex.stats.gram import TensorStats

THRESHOLDS = {"explained_var_rank1": 0.9, "r2_linear": 0.98}


def mean_stderr(values: ArrayLike) -> tuple[float, float]:
    """Mean and standard error (sample SD / sqrt n; nan for fewer than two values) of per-item differences:
    the paired comparison every verdict here reports (accuracy per problem, KL per prompt)."""
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


@dataclass(frozen=True)
class Rank1Fit:
    """The paper's evidence for one tensor: rank-1 share of the deltas and the line through c_1(t)."""

    share: float      # sigma_1^2 / sum_k sigma_k^2 (nan when the tensor did not move)
    r2: float         # R^2 of c_1(t) = a t + b on the real steps
    slope: float
    intercept: float


def rank1_fit(stats: TensorStats) -> Rank1Fit:
    """Rank-1 share and linear fit of the top coefficient c_1 = sigma_1 u_1, from the Gram matrix."""
    values, vectors = stats.spectrum()
    total = float(values.sum())
    if total <= 0:
        return Rank1Fit(float("nan"), float("nan"), 0.0, 0.0)
    coeff = np.sqrt(values[0]) * vectors[:, 0]
    slope, intercept = fit_line(stats.steps, coeff)
    return Rank1Fit(float(values[0] / total), r_squared(stats.steps, coeff), slope, intercept)


@dataclass
class TensorMetrics:
    """What the paper's claims rest on, for one tensor: rank-1 share, line fit quality, scale."""

    name: str
    numel: int
    explained_var_rank1: float  # sigma_1^2 / sum_k sigma_k^2
    r2_linear: float            # R^2 of c_1(t) = a t + b on the real steps
    slope: float
    intercept: float
    delta_norm: float           # ||W_cut - W_0||

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_metrics(name: str, numel: int, stats: TensorStats) -> TensorMetrics:
    fit = rank1_fit(stats)
    return TensorMetrics(name, numel, fit.share, fit.r2, fit.slope, fit.intercept, float(stats.delta_norms[-1]))


def summarize(metrics: list[TensorMetrics]) -> dict:
    """Median, 10th percentile and share above the paper's thresholds, over tensors that moved."""
    moving = [m for m in metrics if m.delta_norm > 0]
    out: dict = {"tensors": len(metrics), "tensors_moving": len(moving)}
    for key, threshold in THRESHOLDS.items():
        values = np.array([getattr(m, key) for m in moving], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = {
            "median": float(np.median(values)) if values.size else float("nan"),
            "p10": float(np.percentile(values, 10)) if values.size else float("nan"),
            f"share_over_{threshold}": float((values > threshold).mean()) if values.size else float("nan"),
        }
    return out


def prediction_terms(gram: np.ndarray, rows: list[int], weights: np.ndarray, target: int) -> tuple[float, float, float]:
    """(<p, r>, ||p||^2, ||r||^2) for p = sum_t weights[t] Delta_{rows[t]} and r = Delta_target, from G alone."""
    w = np.asarray(weights, dtype=np.float64)
    return (float(w @ gram[rows, target]), float(w @ gram[np.ix_(rows, rows)] @ w), float(gram[target, target]))


def gram_errors(terms: list[tuple[float, float, float]]) -> dict[str, float]:
    """Whole-model errors of a prediction from its per-tensor ``prediction_terms``.

    relative_error ||p - r|| / ||r|| and norm_ratio ||p|| / ||r|| over all tensors together, cosine of the
    concatenated vectors, and the mean over tensors (that moved and were predicted to) of cosine and norm ratio.
    """
    err2 = pred2 = dot = real2 = 0.0
    cosines, ratios = [], []
    for t_dot, t_pred2, t_real2 in terms:
        err2 += max(t_pred2 - 2 * t_dot + t_real2, 0.0)
        dot, pred2, real2 = dot + t_dot, pred2 + t_pred2, real2 + t_real2
        if t_pred2 > 0 and t_real2 > 0:
            cosines.append(t_dot / math.sqrt(t_pred2 * t_real2))
            ratios.append(math.sqrt(t_pred2 / t_real2))
    nan = float("nan")
    return {"relative_error": math.sqrt(err2 / real2) if real2 > 0 else nan, "error": math.sqrt(err2),
            "cosine": dot / math.sqrt(pred2 * real2) if pred2 > 0 and real2 > 0 else nan,
            "norm_ratio": math.sqrt(pred2 / real2) if real2 > 0 else nan,
            "mean_cosine": float(np.mean(cosines)) if cosines else nan,
            "mean_norm_ratio": float(np.mean(ratios)) if ratios else nan}
