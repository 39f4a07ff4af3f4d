"""Issue #12: one analysis for analyze and report, shared Gram helpers, and the function-space (probe) backtest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import drift_run, rank1_run, save_pico_model
from relex.analysis.backtest import backtest
from relex.analysis.metrics import rank1_fit
from relex.cli import main
from relex.stats import TensorStats


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _runs(tmp_path):
    """Every run fixture of conftest: (name, base, run, cutoff)."""
    out = []
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "drift", steps=list(range(1, 15)), noise=0.02)
    out.append(("drift", base, tmp_path / "drift", 10))
    drift_run(base, tmp_path / "fib", noise=0.01)
    out.append(("fibonacci steps", base, tmp_path / "fib", 13))
    rank1_run(base, tmp_path / "rank1", steps=list(range(1, 13)))
    out.append(("exact rank 1", base, tmp_path / "rank1", 9))
    drift_run(base, tmp_path / "short", steps=[1, 2, 3, 4], noise=0.02)
    out.append(("too short to backtest", base, tmp_path / "short", 3))
    return out


def test_analyze_and_report_agree_on_every_fixture(tmp_path):
    """One analysis, two renderings: verdict, choice, safe horizon, backtest and alignment are the same."""
    for name, base, run, cutoff in _runs(tmp_path):
        io = ["--base", str(base), "--run", str(run), "--cutoff", str(cutoff), "--no-cache", "-q"]
        assert main(["analyze", *io, "--compare", "--json", str(tmp_path / f"{name}.json")]) == 0
        assert main(["report", *io, "--out", str(tmp_path / f"report-{name}")]) == 0
        analyzed = strict_json((tmp_path / f"{name}.json").read_text())
        reported = strict_json((tmp_path / f"report-{name}" / "report.json").read_text())
        for key in ("observed_steps", "verdict", "chosen", "safe_horizon", "space", "backtest", "alignment",
                    "diagnostics", "summary"):
            assert analyzed[key] == reported[key], (name, key)
        assert "weight space only" in analyzed["verdict"] or analyzed["safe_horizon"] is None, name
        text = (tmp_path / f"report-{name}" / "report.md").read_text()
        assert analyzed["verdict"] in text


def test_one_rank1_helper_and_one_gram_error_helper():
    """rank1_fit matches a direct SVD; the backtest's Gram errors match errors computed on the vectors."""
    rng = np.random.default_rng(0)
    steps = np.arange(1.0, 13.0)
    m = np.outer(steps, rng.standard_normal(40)) + 0.3 * rng.standard_normal((12, 40))
    fit = rank1_fit(TensorStats(steps, m @ m.T))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    assert fit.share == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-9)
    c = np.abs(u[:, 0] * s[0])
    a, b = np.polyfit(steps, c, 1)
    assert fit.slope == pytest.approx(a, rel=1e-8) and fit.intercept == pytest.approx(b, rel=1e-6, abs=1e-9)
    rows = backtest({"w": TensorStats(steps, m @ m.T)})
    row = next(r for r in rows if r["setting"] == "two-point" and r["horizon"] == 2.0)
    stay = m[5]  # prefix 1..6, the stop at step 6
    assert row["error_vs_stay"] * np.linalg.norm(stay - m[-1]) == pytest.approx(
        row["relative_error"] * np.linalg.norm(m[-1]), rel=1e-9)
