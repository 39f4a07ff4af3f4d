"""A window's updates from its Gram matrix (Delta_0 = 0 at step 0): their norms, the cosines between consecutive
ones, and the idle steps they reveal.

An idle step is a checkpoint equal to the one before (no update), or an update that repeats the previous one's
direction at a shrinking size (an optimizer coasting on its momentum with little or no gradient, as GRPO does when
every completion of every group earns the same reward). A window made of such steps looks perfectly straight and
says nothing about the run.
"""

from __future__ import annotations

import numpy as np

from relex.stats.gram import TensorStats

STALL_FRACTION = 1e-6  # an update this small next to the window's largest counts as none
COAST_COSINE = 0.99  # measured on a GRPO run: gradient steps 0.52-0.89, zero-reward steps 0.9992-0.99997
COAST_SHRINK = 0.98  # ... and a coasting optimizer's steps shrink (Adam's by about beta1 / sqrt(beta2))


def increment_norms(stats: TensorStats) -> np.ndarray:
    """||Delta_t - Delta_{t-1}|| for each observed step, with Delta_0 = 0."""
    g = stats.gram
    diag = np.diag(g)
    prev = np.concatenate([[0.0], diag[:-1]])
    cross = np.concatenate([[0.0], np.diag(g, -1)])
    return np.sqrt(np.clip(diag - 2 * cross + prev, 0.0, None))


def update_cosines(stats: TensorStats) -> np.ndarray:
    """cos(Delta_t - Delta_{t-1}, Delta_{t-1} - Delta_{t-2}) for each observed step (nan for the first, or
    where either update is zero), with Delta_0 = 0."""
    g = np.pad(stats.gram, ((1, 0), (1, 0)))  # index 0 is step 0, where Delta = 0
    t = np.arange(2, len(g))
    dot = g[t, t - 1] - g[t - 1, t - 1] - g[t, t - 2] + g[t - 1, t - 2]
    norms = increment_norms(stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (norms[1:] * norms[:-1])
    return np.concatenate([[np.nan], np.clip(cos, -1.0, 1.0)])


def idle_steps(stats: TensorStats) -> dict[str, list[int]]:
    """Steps of the window that carry no new gradient: ``stalled`` (the checkpoint equals the one before)
    and ``coasting`` (the update repeats the previous one's direction, smaller per step)."""
    gaps = np.diff(np.concatenate([[0.0], stats.steps]))
    norms = increment_norms(stats)
    per_step = norms / gaps
    stalled = norms <= STALL_FRACTION * norms.max(initial=0.0)
    cos = update_cosines(stats)
    shrinking = np.concatenate([[False], per_step[1:] < COAST_SHRINK * per_step[:-1]])
    coasting = ~stalled & (np.nan_to_num(cos) >= COAST_COSINE) & shrinking
    return {"stalled": [int(s) for s in stats.steps[stalled]], "coasting": [int(s) for s in stats.steps[coasting]]}


def idle_warning(idle: dict[str, list[int]], n_steps: int) -> str:
    """A sentence on a window's idle steps (``idle_steps``; empty when every step moved on a gradient of its own)."""
    stalled, coasting = idle["stalled"], idle["coasting"]
    if not stalled and not coasting:
        return ""
    parts = []
    if stalled:
        parts.append(f"checkpoint{'s' * (len(stalled) > 1)} {_steps(stalled)} did not move from the one before "
                     "(no update: e.g. every completion of every group got the same reward)")
    if coasting:
        many = len(coasting) > 1
        parts.append(f"the update{'s' * many} at step{'s' * many} {_steps(coasting)} repeat{'' if many else 's'} the "
                     f"direction before at a smaller size (cos >= {COAST_COSINE}), as an optimizer coasting on its "
                     "momentum with little or no gradient does")
    live = n_steps - len(stalled) - len(coasting)
    own = f"{live} update{'s' * (live != 1)} with a gradient of {'their' if live != 1 else 'its'} own"
    meaning = "; its straightness says nothing about the run." if live < 3 else "."
    return f"{'; '.join(parts)}. The window holds {own}{meaning}"


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:-1])) + (" and " if len(steps) > 1 else "") + str(steps[-1])
