"""Weight-space alignment of a method's predictions with real later checkpoints (paper, Appendix B).

Everything follows from the Gram matrix over observed and later steps: for a predicted delta
p = M_obs^T a and a real delta r = Delta_s, <p, r> = a^T G[obs, s], ||p||^2 = a^T G_obs a, ||r||^2 = G[s, s].
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from relex.methods.base import Method
from relex.stats.gram import TensorStats


def alignment(method: Method, stats: dict[str, TensorStats], observed: list[int], later: list[int]) -> list[dict]:
    """Per later step: mean per-tensor cosine, mean norm ratio and global relative error of the prediction."""
    rows = []
    per_tensor = {}
    for name, full in stats.items():
        if full.name is None:  # methods may depend on the tensor (e.g. two-point's norms from the cutoff)
            full = replace(full, name=name)
        index = {int(s): i for i, s in enumerate(full.steps)}
        obs = [index[s] for s in observed]
        weights = method.weights(full.subset(observed), later)
        g_obs = full.gram[np.ix_(obs, obs)]
        per_tensor[name] = [(float(w @ full.gram[obs, index[s]]), float(w @ g_obs @ w), float(full.gram[index[s], index[s]]))
                            for w, s in zip(weights, later)]
    for j, step in enumerate(later):
        cosines, ratios = [], []
        err2 = real2 = 0.0
        for values in per_tensor.values():
            dot, pred2, r2 = values[j]
            err2 += max(pred2 - 2 * dot + r2, 0.0)
            real2 += r2
            if pred2 > 0 and r2 > 0:
                cosines.append(dot / np.sqrt(pred2 * r2))
                ratios.append(np.sqrt(pred2 / r2))
        rows.append({"step": step,
                     "mean_cosine": float(np.mean(cosines)) if cosines else float("nan"),
                     "mean_norm_ratio": float(np.mean(ratios)) if ratios else float("nan"),
                     "relative_error": float(np.sqrt(err2 / real2)) if real2 > 0 else float("nan")})
    return rows
