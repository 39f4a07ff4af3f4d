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

from relex.analysis.metrics import gram_errors, prediction_terms
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
    terms, stay = [], []
    for st in stats.values():
        w = method.weights(st.subset(prefix), [final])[0]
        terms.append(prediction_terms(st.gram, p_idx, w, f))
        stay.append(prediction_terms(st.gram, [p], np.ones(1), f))
    pred, stop = gram_errors(terms), gram_errors(stay)
    return {"relative_error": pred["relative_error"],
            "error_vs_stay": pred["error"] / stop["error"] if stop["error"] > 0 else float("nan"),
            "cosine": pred["cosine"], "mean_tensor_cosine": pred["mean_cosine"], "norm_ratio": pred["norm_ratio"]}


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


def best_supported(rows: list[dict], max_error: float = 0.5) -> tuple[str, float]:
    """(setting, safe horizon) of the setting that the backtest supports furthest; ties go to the lower
    relative error at that horizon. The one choice that ``relex analyze`` and ``relex report`` show."""
    safe = {label: safe_horizon(rows, label, max_error) for label in dict.fromkeys(r["setting"] for r in rows)}
    first = min(r["horizon"] for r in rows)

    def error_at(label: str) -> float:
        h = safe[label] if safe[label] > 1 else first
        row = next((r for r in rows if r["setting"] == label and r["horizon"] == h), None)
        return row["relative_error"] if row and not math.isnan(row["relative_error"]) else math.inf

    label = min(safe, key=lambda lb: (-safe[lb], error_at(lb)))
    return label, safe[label]

