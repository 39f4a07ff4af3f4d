"""Trend families for a coefficient trajectory c(t), fit by least squares on the real step numbers.

``linear`` is the paper's choice. ``quadratic`` and ``power`` (c = a t^p + b, p on a grid) are the
alternatives a backtest can choose between when a run's deltas grow sub- or super-linearly. ``mlp`` is
the paper's "more complicated function" ablation: a small tanh network fit to (t, c), deterministic.
``linear`` and ``quadratic`` take the steps relative to the first (exact up to the CLI's 10**15); ``power``
and ``mlp`` scale them by the last, which leaves steps that large indistinguishable.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from relex.errors import RelexError
from relex.stats.fitting import fit_line, line

Trend = Callable[[np.ndarray], np.ndarray]
POWER_GRID = np.round(np.arange(0.1, 2.01, 0.05), 2)


def _linear(t: np.ndarray, y: np.ndarray) -> Trend:
    return line(t, y)


def _quadratic(t: np.ndarray, y: np.ndarray) -> Trend:
    """c = a s^2 + b s + d in s = (t - t_first) / span: the same parabola as in t, well conditioned at any step."""
    if len(t) < 3:
        return _linear(t, y)
    origin, span = t[0], float(np.ptp(t)) or 1.0
    coef = np.polyfit((t - origin) / span, y, 2)
    return lambda x: np.polyval(coef, (np.asarray(x, dtype=np.float64) - origin) / span)


def _power(t: np.ndarray, y: np.ndarray) -> Trend:
    """c = a t^p + b: a least-squares line in t^p for each p of a grid, keeping the best p."""
    scale = t.max()
    best = None
    for p in POWER_GRID:
        x = (t / scale) ** p
        a, b = fit_line(x, y)
        sse = float(((a * x + b - y) ** 2).sum())
        if best is None or sse < best[0] - 1e-15 * max(abs(sse), 1.0):
            best = (sse, p, a, b)
    _, p, a, b = best
    return lambda x: a * (np.asarray(x, dtype=np.float64) / scale) ** p + b


def _mlp(t: np.ndarray, y: np.ndarray, hidden: int = 16, iterations: int = 200) -> Trend:
    """c = MLP(t / t_max): one tanh layer, full-batch L-BFGS on the squared error, fixed seed."""
    import torch

    scale_t, mean_y, scale_y = t.max(), y.mean(), max(float(y.std()), 1e-12)
    x = torch.tensor(t / scale_t, dtype=torch.float64)[:, None]
    target = torch.tensor((y - mean_y) / scale_y, dtype=torch.float64)[:, None]
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    optimizer = torch.optim.LBFGS(net.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)

    def predict(v):
        with torch.no_grad():
            inp = torch.tensor(np.atleast_1d(np.asarray(v, dtype=np.float64)) / scale_t)[:, None]
            return net(inp)[:, 0].numpy() * scale_y + mean_y

    return predict


TRENDS: dict[str, Callable[[np.ndarray, np.ndarray], Trend]] = {
    "linear": _linear, "quadratic": _quadratic, "power": _power, "mlp": _mlp}


def fit_trend(family: str, steps: np.ndarray, values: np.ndarray) -> Trend:
    """Fit ``family`` to (steps, values); returns the fitted function of the step."""
    if family not in TRENDS:
        raise RelexError(f"unknown trend {family!r}: choose one of {', '.join(TRENDS)}")
    return TRENDS[family](np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64))
