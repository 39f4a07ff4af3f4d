"""``--auto``: choose the extrapolation setting by backtest, and refuse targets it cannot support.

With probe rows (``analysis.probe``) the judgement is in function space: a setting is supported at a
horizon only if its predictions behaved more like the real checkpoint than stopping did, beyond the
probe's noise; the chosen one is the supported setting with the lowest KL at the target's horizon.
Without them it is the weight-space backtest's (relative weight error), which the lab showed does not
track accuracy; the record and a warning say so.
"""

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
                max_error: float = 0.5, force: bool = False, clip: bool = False,
                rows: list[dict] | None = None, probe_rows: list[dict] | None = None) -> tuple[Method, list[int], dict]:
    """(method, targets to write, the record of the choice for relex.json).

    ``rows``: the weight-space backtest of ``stats`` when already computed; ``probe_rows``: its function-space
    comparison (``analysis.probe.probe_backtest``), which then decides.
    """
    steps = [int(s) for s in next(iter(stats.values())).steps]
    last = steps[-1]
    rows = backtest(stats) if rows is None else rows
    ratio = max(targets) / last
    at = scoring_horizon(rows, ratio)
    if probe_rows:
        label, safe, reason = choose_by_probe(probe_rows, ratio, at)
        space = "function"
    else:
        label = choose(rows, ratio)
        safe = safe_horizon(rows, label, max_error)
        best = next(r for r in rows if r["setting"] == label and r["horizon"] == at)
        reason = (f"lowest backtest error at {at:g}x the prefix ({best['relative_error']:.3f} relative, "
                  f"{best['error_vs_stay']:.2f} of stopping); safe horizon {safe:g}x at max error {max_error}")
        space = "weight"
        log.warning("--auto without --probe judges in weight space only (relative weight error), which does not "
                    "track accuracy; pass --probe FILE to compare the models' outputs with stopping")
    setting = next(s for s in default_settings() if s.label == label)
    method = setting.build(steps)
    method.cutoff = cutoff
    limit = math.floor(last * safe)
    too_far = [t for t in targets if t > limit]
    what = "function-space backtest" if space == "function" else "backtest"
    basis = "" if space == "function" else "; weight space only, no --probe"
    if too_far and not force:
        if safe <= 1 and space == "function":
            raise RelexError(f"no setting's prediction beat stopping at step {last} on the probe beyond its noise "
                             f"at any horizon ({reason}); keep checkpoint {last} or pass --force")
        if not clip:
            raise RelexError(f"target {too_far[0]} is {too_far[0] / last:.2f}x the last observed step {last}, "
                             f"beyond the {safe:g}x the {what} supports ({label}{basis}); pass --clip to write step "
                             f"{limit} instead or --force to extrapolate anyway")
        log.warning("clipping targets %s to step %d (%gx the last observed step, the %s's safe horizon)",
                    too_far, limit, safe, what)
        targets = sorted({min(t, limit) for t in targets})
        if limit <= last:
            raise RelexError(f"the {what} supports no extrapolation beyond step {last} ({label}{basis}); nothing to write")
    record = {"chosen": label, "setting": setting.params, "method_params": method.params(), "reason": reason,
              "safe_horizon": safe, "space": space, "max_error": max_error, "forced": bool(too_far and force),
              "backtest": rows}
    if probe_rows:
        record["probe"] = probe_rows
    return method, list(targets), record


def choose_by_probe(probe_rows: list[dict], ratio: float, at: float) -> tuple[str, float, str]:
    """(setting, its function-space safe horizon, the reason): among settings whose safe horizon reaches
    ``ratio``, the lowest KL at the scoring horizon ``at``; if none reaches it, the one supported furthest."""
    from relex.analysis.probe import best_supported_by_probe, safe_horizon_by_probe

    labels = list(dict.fromkeys(r["setting"] for r in probe_rows))
    safe = {lb: safe_horizon_by_probe(probe_rows, lb) for lb in labels}
    reaching = [lb for lb in labels if safe[lb] >= ratio]
    if reaching:
        rows = {r["setting"]: r for r in probe_rows if r["horizon"] == at}
        label = min(reaching, key=lambda lb: rows[lb]["kl"] if lb in rows else math.inf)
    else:
        label, _ = best_supported_by_probe(probe_rows)
    row = next((r for r in probe_rows if r["setting"] == label and r["horizon"] == at), None)
    detail = (f"probe KL {row['kl']:.4f} vs stopping's {row['kl_stop']:.4f} at {at:g}x (difference "
              f"{row['kl_diff']:+.4f} +- {row['kl_diff_se']:.4f}, margin {row['margin']:g} SE), greedy agreement "
              f"{row['agreement']:.3f} vs {row['agreement_stop']:.3f}") if row else f"no probe row at {at:g}x"
    return label, safe[label], f"{label}: {detail}; function-space safe horizon {safe[label]:g}x"
