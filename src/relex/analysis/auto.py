"""``--auto``: choose the extrapolation setting by backtest error, and refuse targets it cannot support."""

from __future__ import annotations

import logging
import math
from typing import Sequence

from relex.analysis.backtest import backtest, choose, default_settings, safe_horizon, scoring_horizon
from relex.errors import RelexError
from relex.methods import Method
from relex.stats.gram import TensorStats

log = logging.getLogger(__name__)


def auto_method(stats: dict[str, TensorStats], targets: Sequence[int], cutoff: int | None, *,
                max_error: float = 0.5, force: bool = False, clip: bool = False) -> tuple[Method, list[int], dict]:
    """(method, targets to write, the record of the choice for relex.json)."""
    steps = [int(s) for s in next(iter(stats.values())).steps]
    last = steps[-1]
    rows = backtest(stats)
    ratio = max(targets) / last
    label = choose(rows, ratio)
    setting = next(s for s in default_settings() if s.label == label)
    safe = safe_horizon(rows, label, max_error)
    method = setting.build(steps)
    method.cutoff = cutoff
    at = scoring_horizon(rows, ratio)
    best = next(r for r in rows if r["setting"] == label and r["horizon"] == at)
    reason = (f"lowest backtest error at {at:g}x the prefix ({best['relative_error']:.3f} relative, "
              f"{best['error_vs_stay']:.2f} of stopping); safe horizon {safe:g}x at max error {max_error}")
    limit = math.floor(last * safe)
    too_far = [t for t in targets if t > limit]
    if too_far and not force:
        if not clip:
            raise RelexError(f"target {too_far[0]} is {too_far[0] / last:.2f}x the last observed step {last}, "
                             f"beyond the {safe:g}x the backtest supports ({label}); pass --clip to write step "
                             f"{limit} instead or --force to extrapolate anyway")
        log.warning("clipping targets %s to step %d (%gx the last observed step, the backtest's safe horizon)",
                    too_far, limit, safe)
        targets = sorted({min(t, limit) for t in targets})
        if limit <= last:
            raise RelexError(f"the backtest supports no extrapolation beyond step {last} ({label}); nothing to write")
    record = {"chosen": label, "setting": setting.params, "method_params": method.params(), "reason": reason,
              "safe_horizon": safe, "max_error": max_error, "forced": bool(too_far and force), "backtest": rows}
    return method, list(targets), record
