"""Closed-form least-squares fits of a coefficient trajectory against the real step numbers."""

from __future__ import annotations

import numpy as np


def fit_line(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the least-squares line values ~ a * steps + b."""
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    tc = t - t.mean()
    var = float(tc @ tc)
    slope = float(tc @ (y - y.mean())) / var if var > 0 else 0.0
    return slope, float(y.mean() - slope * t.mean())


def r_squared(steps: np.ndarray, values: np.ndarray) -> float:
    """Coefficient of determination of the line fit (nan when the values are constant)."""
    a, b = fit_line(steps, values)
    y = np.asarray(values, dtype=np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 0:
        return float("nan")
    residual = float(((y - (a * np.asarray(steps, dtype=np.float64) + b)) ** 2).sum())
    return 1.0 - residual / total
