"""The closed-form error of any weighted-sum prediction from Gram statistics (shared by the backtest and
alignment), and the paired mean and standard error every verdict reports (per-tensor metrics: ``stats.summary``)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def mean_stderr(values: ArrayLike) -> tuple[float, float]:
    """Mean and standard error (sample SD / sqrt n; nan for fewer than two values) of per-item differences:
    the paired comparison every verdict here reports (accuracy per problem, KL per prompt)."""
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


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
