"""Weight-space alignment of a method's predictions with real later checkpoints (paper, Appendix B).

Everything follows from the Gram matrix over observed and later steps (``metrics.prediction_terms``):
for a predicted delta p = M_obs^T a and a real delta r = Delta_s, <p, r> = a^T G[obs, s],
||p||^2 = a^T G_obs a, ||r||^2 = G[s, s].
"""

from __future__ import annotations

from dataclasses import replace

from relex.analysis.metrics import gram_errors, prediction_terms
from relex.methods.base import Method
from relex.stats.gram import TensorStats


def alignment(method: Method, stats: dict[str, TensorStats], observed: list[int], later: list[int]) -> list[dict]:
    """Per later step: mean per-tensor cosine, mean norm ratio and global relative error of the prediction."""
    terms: list[list[tuple[float, float, float]]] = [[] for _ in later]
    for name, full in stats.items():
        if full.name is None:  # methods may depend on the tensor (e.g. two-point's norms from the cutoff)
            full = replace(full, name=name)
        index = {int(s): i for i, s in enumerate(full.steps)}
        obs = [index[s] for s in observed]
        weights = method.weights(full.subset(observed), later)
        for j, (w, s) in enumerate(zip(weights, later)):
            terms[j].append(prediction_terms(full.gram, obs, w, index[s]))
    rows = []
    for step, step_terms in zip(later, terms):
        errors = gram_errors(step_terms)
        rows.append({"step": step, "mean_cosine": errors["mean_cosine"], "mean_norm_ratio": errors["mean_norm_ratio"],
                     "relative_error": errors["relative_error"]})
    return rows
