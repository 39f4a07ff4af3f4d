"""Window offset: take deltas from an observed anchor checkpoint W_a instead of the base W_0.

With Delta'_t = Delta_t - Delta_a for the steps after a, the Gram is G' = C G C^T (rows of C are
e_t - e_a), and a prediction W_a + sum_t w'_t Delta'_t is, in deltas from the base,
Delta_a + sum_t w'_t (Delta_t - Delta_a): still a weighted sum, with weights w' C + e_a.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from relex.errors import RelexError
from relex.stats.gram import TensorStats


def anchored_weights(stats: TensorStats, targets: Sequence[float], anchor: int,
                     weights: Callable[[TensorStats, Sequence[float]], np.ndarray]) -> np.ndarray:
    """Weights on base deltas of a method applied to deltas taken from the checkpoint at ``anchor``."""
    steps = [int(s) for s in stats.steps]
    if anchor == 0:
        return weights(stats, targets)
    if anchor not in steps:
        raise RelexError(f"anchor step {anchor} is not an observed step ({', '.join(map(str, steps))})")
    a = steps.index(anchor)
    later = [i for i, s in enumerate(steps) if s > anchor]
    if len(later) < 2:
        raise RelexError(f"anchor step {anchor} leaves {len(later)} observed step(s) after it; a fit needs two")
    change = np.zeros((len(later), len(steps)))
    change[np.arange(len(later)), later] = 1.0
    change[:, a] -= 1.0
    window = TensorStats(stats.steps[later], change @ stats.gram @ change.T, stats.name, stats.shape)
    out = weights(window, targets) @ change
    out[:, a] += 1.0
    return out
