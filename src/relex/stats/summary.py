"""The paper's evidence from Gram statistics: per tensor, the rank-1 share of its deltas and the line fit of its top
coefficient; over a model, their summary (relex.json's ``trajectory_summary``, ``relex analyze``'s ``summary``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from relex.stats.fitting import fit_line, r_squared
from relex.stats.gram import TensorStats

THRESHOLDS = {"explained_var_rank1": 0.9, "r2_linear": 0.98}


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
