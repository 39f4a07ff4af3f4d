"""The one analysis of a run that ``relex analyze`` and ``relex report`` render: computed here, once.

Per-tensor metrics and their summary, diagnostics against a random walk, the backtest, the setting it
supports furthest with its safe horizon, the verdict line, and (when the statistics hold checkpoints
after the observed window) RELEX's alignment with them. With probe rows (``analysis.probe``) the choice and
safe horizon come from the function-space backtest; without, the verdict says it is weight-space only.
"""

from __future__ import annotations

import math

from relex.analysis.alignment import alignment
from relex.analysis.backtest import backtest, best_supported
from relex.analysis.diagnostics import diagnose, verdict
from relex.methods import Relex
from relex.stats.gram import TensorStats
from relex.stats.summary import summarize, tensor_metrics


def analyze_run(stats: dict[str, TensorStats], observed: list[int], *, max_error: float = 0.5,
                probe_rows: list[dict] | None = None) -> dict:
    """The analysis of the window ``observed`` (steps in ``stats``; later steps there give the alignment).

    ``probe_rows`` (from ``analysis.probe.probe_backtest`` on the same window) switch the choice and the safe
    horizon to function space.
    """
    obs_stats = {n: s.subset(observed) for n, s in stats.items()}
    metrics = [tensor_metrics(n, math.prod(s.shape) if s.shape is not None else 0, s) for n, s in obs_stats.items()]
    diag = diagnose(obs_stats)
    rows = backtest(obs_stats)
    chosen = safe = None
    space = "function" if probe_rows else "weight"
    if probe_rows:
        from relex.analysis.probe import best_supported_by_probe

        chosen, safe = best_supported_by_probe(probe_rows)
    elif rows:
        chosen, safe = best_supported(rows, max_error)
    later = [int(s) for s in next(iter(stats.values())).steps if s > observed[-1]]
    out = {"observed_steps": list(observed), "summary": summarize(metrics), "tensors": [m.as_dict() for m in metrics],
           "diagnostics": diag, "backtest": rows, "chosen": chosen, "safe_horizon": safe, "space": space,
           "max_error": max_error, "verdict": verdict(diag, safe, chosen, space),
           "alignment": alignment(Relex(), stats, observed, later) if later else []}
    if probe_rows:
        out["probe"] = probe_rows
    return out
