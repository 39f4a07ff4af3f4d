"""Backtest inside the observed window: fit on a prefix, predict the last observed checkpoint.

For a horizon ratio h the prefix is the checkpoints with step <= C / h (C = cutoff); each setting
predicts W_C from it, and its error against the real W_C follows from the Gram matrix alone:
for prediction weights w on the prefix deltas, ||pred - real||^2 = w'G_PP w - 2 w'G_PC + G_CC.
Errors are relative to the real movement ||W_C - W_0||; ``error_vs_stay`` divides by the error of
stopping at the prefix (||W_C - W_p||): below 1, extrapolating beat not extrapolating at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from relex.errors import RelexError
from relex.methods import Method, Relex, TwoPoint
from relex.stats.gram import TensorStats

HORIZONS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
MIN_PREFIX = 3


@dataclass(frozen=True)
class Setting:
    """A named way to extrapolate, built for a given window of observed steps."""

    label: str
    build: Callable[[list[int]], Method]
    params: dict


def anchor_at(steps: list[int], fraction: float) -> int:
    """The latest observed step at or before ``fraction`` of the window that leaves two steps after it."""
    if fraction <= 0:
        return 0
    usable = [s for s in steps[:-2] if s <= fraction * steps[-1]]
    return usable[-1] if usable else 0


def _relex_at(steps: list[int], trend: str, fraction: float) -> Relex:
    anchor = anchor_at(steps, fraction)
    if fraction > 0 and anchor == 0:
        raise RelexError(f"window {steps[0]}..{steps[-1]} has no anchor at {fraction:.0%} leaving two steps after it")
    return Relex(trend=trend, anchor=anchor)


def default_settings() -> list[Setting]:
    """The grid the backtest compares: trend x window offset for RELEX rank 1, rank 2, two-point."""
    out = []
    for trend in ("linear", "quadratic", "power"):
        for fraction in (0.0, 0.25, 0.5):
            label = f"relex {trend}" + (f", anchor@{fraction:.0%}" if fraction else "")
            out.append(Setting(label, lambda steps, t=trend, f=fraction: _relex_at(steps, t, f),
                               {"method": "relex", "rank": 1, "trend": trend, "anchor_fraction": fraction}))
    out.append(Setting("relex linear, rank 2", lambda steps: Relex(rank=2),
                       {"method": "relex", "rank": 2, "trend": "linear", "anchor_fraction": 0.0}))
    out.append(Setting("two-point", lambda steps: TwoPoint(), {"method": "two-point", "anchor_fraction": 0.0}))
    return out


def backtest(stats: dict[str, TensorStats], settings: Sequence[Setting] | None = None,
             horizons: Sequence[float] = HORIZONS) -> list[dict]:
    """One row per (horizon, setting) that the window allows, with errors from the Gram matrices."""
    settings = list(settings or default_settings())
    steps = [int(s) for s in next(iter(stats.values())).steps]
    final = steps[-1]
    rows = []
    for h in horizons:
        prefix = [s for s in steps if s <= final / h]
        if len(prefix) < MIN_PREFIX:
            continue
        for setting in settings:
            try:
                method = setting.build(prefix)
                totals = _errors(stats, method, steps, prefix, final)
            except RelexError:
                continue
            rows.append({"horizon": h, "prefix_end": prefix[-1], "target": final,
                         "actual_horizon": final / prefix[-1], "setting": setting.label, **totals})
    return rows


def _errors(stats: dict[str, TensorStats], method: Method, steps: list[int], prefix: list[int], final: int) -> dict:
    idx = {s: i for i, s in enumerate(steps)}
    p_idx = [idx[s] for s in prefix]
    f, p = idx[final], idx[prefix[-1]]
    err2 = real2 = pred2 = dot = stay2 = 0.0
    cosines = []
    for st in stats.values():
        g = st.gram
        w = method.weights(st.subset(prefix), [final])[0]
        t_pred2 = float(w @ g[np.ix_(p_idx, p_idx)] @ w)
        t_dot = float(w @ g[p_idx, f])
        t_real2 = float(g[f, f])
        err2 += max(t_pred2 - 2 * t_dot + t_real2, 0.0)
        stay2 += max(g[p, p] - 2 * g[p, f] + g[f, f], 0.0)
        pred2, dot, real2 = pred2 + t_pred2, dot + t_dot, real2 + t_real2
        if t_pred2 > 0 and t_real2 > 0:
            cosines.append(t_dot / math.sqrt(t_pred2 * t_real2))
    nan = float("nan")
    return {"relative_error": math.sqrt(err2 / real2) if real2 > 0 else nan,
            "error_vs_stay": math.sqrt(err2 / stay2) if stay2 > 0 else nan,
            "cosine": dot / math.sqrt(pred2 * real2) if pred2 > 0 and real2 > 0 else nan,
            "mean_tensor_cosine": float(np.mean(cosines)) if cosines else nan,
            "norm_ratio": math.sqrt(pred2 / real2) if real2 > 0 else nan}


def scoring_horizon(rows: list[dict], ratio: float) -> float:
    """The tested horizon closest to ``ratio`` from below (the smallest tested one if all are above)."""
    tested = sorted({r["horizon"] for r in rows})
    if not tested:
        raise RelexError(f"the window is too short to backtest: need {MIN_PREFIX} checkpoints at or before "
                         f"cutoff/{HORIZONS[0]}")
    below = [h for h in tested if h <= ratio]
    return below[-1] if below else tested[0]


def choose(rows: list[dict], ratio: float) -> str:
    """The setting with the smallest relative error at the scoring horizon for ``ratio``."""
    h = scoring_horizon(rows, ratio)
    candidates = [r for r in rows if r["horizon"] == h and not math.isnan(r["relative_error"])]
    return min(candidates, key=lambda r: r["relative_error"])["setting"]


def safe_horizon(rows: list[dict], setting: str, max_error: float = 0.5) -> float:
    """Largest tested horizon up to which ``setting`` beat stopping and stayed under ``max_error``."""
    safe = 1.0
    for row in sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["horizon"]):
        if not (row["error_vs_stay"] < 1.0 and row["relative_error"] <= max_error):
            break
        safe = row["horizon"]
    return safe
