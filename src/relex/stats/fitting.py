"""Closed-form least-squares fits of a coefficient trajectory against the real step numbers.

Steps are taken relative to the first one before anything is summed: integer steps below 2**53 (the CLI
allows up to 10**15) and their differences are exact in float64, so a run at step 10**15 fits as one at step 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Line:
    """values ~ slope * (step - origin - centre) + level: the least-squares line about the steps' own mean."""

    slope: float
    origin: float  # the first step, subtracted exactly
    centre: float  # the mean of the steps after the origin is subtracted
    level: float  # the mean of the values

    def __call__(self, steps: np.ndarray | float) -> np.ndarray:
        return self.slope * ((np.asarray(steps, dtype=np.float64) - self.origin) - self.centre) + self.level

    @property
    def intercept(self) -> float:
        """The line's value at step 0."""
        return float(self(0.0))


def line(steps: np.ndarray, values: np.ndarray) -> Line:
    """The least-squares line through (steps, values), computed on steps relative to the first."""
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    origin = float(t[0]) if t.size else 0.0
    shifted = t - origin
    centre = float(shifted.mean())
    tc = shifted - centre
    var = float(tc @ tc)
    level = float(y.mean())
    slope = float(tc @ (y - level)) / var if var > 0 else 0.0
    return Line(slope, origin, centre, level)


def fit_line(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the least-squares line values ~ a * steps + b."""
    fitted = line(steps, values)
    return fitted.slope, fitted.intercept


def r_squared(steps: np.ndarray, values: np.ndarray) -> float:
    """Coefficient of determination of the line fit (nan when the values are constant)."""
    y = np.asarray(values, dtype=np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 0:
        return float("nan")
    residual = float(((y - line(steps, y)(steps)) ** 2).sum())
    return 1.0 - residual / total
