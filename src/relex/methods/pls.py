"""Partial least squares with one component and a scalar response (PLS1), in float64 numpy.

It is what AlphaRL's original code gets from scikit-learn (``PLSRegression(n_components=1)``, then a
``LinearRegression`` of y on the PLS score, inverted at a target y and mapped back with
``inverse_transform``), written out:

    X0 = (X - mean) / std  (std = 1 without scaling, or where a column is constant), y0 = y - mean(y)
    w  = X0^T y0 / ||X0^T y0||          weights (one NIPALS step is exact for a scalar y)
    t  = X0 w                           scores
    p  = X0^T t / (t^T t)               loadings
    y ~ slope * t + intercept           least squares on the scores
    x(y*) = mean + std * p * (y* - intercept) / slope

Scaling y (scikit-learn's default) changes nothing here: the linear map absorbs it. When the rows of
X do not covary with y (X0^T y0 = 0: the vectors did not move with y), there is no direction to
follow and ``invert`` returns the mean row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relex.stats.fitting import fit_line


@dataclass
class PLS1:
    """A fitted one-component PLS regression of a scalar y on the rows of X."""

    x_mean: np.ndarray
    x_std: np.ndarray
    weights: np.ndarray
    loadings: np.ndarray
    slope: float       # y ~ slope * score + intercept
    intercept: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, scale: bool = True) -> "PLS1":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
            raise ValueError(f"PLS1 needs X (n x d, n >= 2) and y (n,), got {x.shape} and {y.shape}")
        mean = x.mean(axis=0)
        std = x.std(axis=0, ddof=1) if scale else np.ones(x.shape[1])
        std = np.where(std > 0, std, 1.0)
        x0 = (x - mean) / std
        cov = x0.T @ (y - y.mean())
        norm = float(np.linalg.norm(cov))
        scores = np.zeros(x.shape[0])
        if norm > 0:
            weights = cov / norm
            scores = x0 @ weights
        tt = float(scores @ scores)
        if norm == 0 or tt == 0:
            zeros = np.zeros(x.shape[1])
            return cls(mean, std, zeros, zeros, 0.0, float(y.mean()))
        loadings = x0.T @ scores / tt
        slope, intercept = fit_line(scores, y)
        return cls(mean, std, weights, loadings, slope, intercept)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """PLS scores of rows of X."""
        return ((np.asarray(x, dtype=np.float64) - self.x_mean) / self.x_std) @ self.weights

    def predict(self, x: np.ndarray) -> np.ndarray:
        """y predicted from rows of X through their scores."""
        return self.slope * self.transform(x) + self.intercept

    def invert(self, y: float) -> np.ndarray:
        """The row of X whose score the linear map sends to ``y``: mean + std * loadings * score."""
        if self.slope == 0:
            return self.x_mean.copy()
        score = (float(y) - self.intercept) / self.slope
        return self.x_mean + self.x_std * self.loadings * score
