"""Issue #12: one analysis for analyze and report, shared Gram helpers, and the function-space (probe) backtest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import drift_run, rank1_run, save_pico_model
from relex.analysis.backtest import backtest
from relex.cli import main
from relex.stats import TensorStats
from relex.stats.summary import rank1_fit


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


# -- the function-space backtest ---------------------------------------------------------------------------------
UNUSED_TOKENS = [15, 16, 17]  # 'a', 'b', 'c' of the pico tokenizer: never in the probe prompts


def turning_run(base, run, turn: bool, steps=range(1, 13), eps: float = 0.003, embed_speed: float = 1.0) -> None:
    """Every tensor that shapes the outputs drifts along a fixed direction A, with coefficient t, until step 8; in a
    turning run it then heads back (8 - 2 (t - 8): at the base again by step 12). Meanwhile the embedding rows of
    tokens the probe never feeds move straight and fast: most of the weight movement, none of the function."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(5)
    w0 = load_file(str(base / "model.safetensors"))
    direction = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in w0.items()}
    embed = "model.embed_tokens.weight"
    direction[embed] = torch.zeros_like(direction[embed])
    direction[embed][UNUSED_TOKENS] = torch.randn(len(UNUSED_TOKENS), w0[embed].shape[1], generator=gen,
                                                  dtype=torch.float64)
    for step in steps:
        f = step if not turn or step <= 8 else 8 - 2 * (step - 8)
        tensors = {n: (t.double() + (embed_speed * step if n == embed else eps * f) * direction[n]).to(t.dtype)
                   for n, t in w0.items()}
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def probe_file(path):
    rng = np.random.default_rng(0)
    path.write_text("\n".join(f"{a}+{b}=" for a, b in rng.integers(10, 99, size=(24, 2))) + "\n")
    return path


def probe_backtest(tmp_path, turn: bool, tokens: int) -> tuple[list[str], list[str], dict]:
    """A pico base and a (turning or straight) run, `relex backtest --probe` on it: the CLI's io and probe
    arguments, and the backtest's JSON."""
    base = save_pico_model(tmp_path / "base")
    turning_run(base, tmp_path / "run", turn=turn)
    io = ["--base", str(base), "--run", str(tmp_path / "run"), "--cache", str(tmp_path / "c"), "-q"]
    probe = ["--probe", str(probe_file(tmp_path / "probe.txt")), "--probe-tokens", str(tokens)]
    assert main(["backtest", *io, *probe, "--json", str(tmp_path / "bt.json")]) == 0
    return io, probe, strict_json((tmp_path / "bt.json").read_text())


def test_a_turning_run_is_safe_in_weight_space_and_refused_in_function_space(tmp_path, capsys):
    io, probe, data = probe_backtest(tmp_path, turn=True, tokens=1)
    assert data["space"] == "function"
    assert data["safe_horizon"]["relex linear"] >= 3  # weight space: the embedding rows dominate, and go straight
    assert data["probe_safe_horizon"]["relex linear"] == 1.0  # function space: stopping is closer
    row = next(r for r in data["probe"] if r["setting"] == "relex linear" and r["horizon"] == 1.5)
    assert row["kl"] > row["kl_stop"] and not row["safe"]
    # --auto: weight space writes step 18, function space refuses with one line and writes nothing
    assert main(["extrapolate", *io, "--auto", "--target", "18", "--out", str(tmp_path / "weight")]) == 0
    capsys.readouterr()
    assert main(["extrapolate", *io, "--auto", *probe, "--target", "18", "--out", str(tmp_path / "fn")]) == 2
    err = capsys.readouterr().err.strip()
    assert "beat stopping" in err and "probe" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "fn").exists()
    assert main(["extrapolate", *io, "--auto", *probe, "--clip", "--target", "18",
                 "--out", str(tmp_path / "clip")]) == 2 and not (tmp_path / "clip").exists()


def test_a_straight_run_extrapolates_in_both_spaces(tmp_path):
    io, probe, data = probe_backtest(tmp_path, turn=False, tokens=4)
    assert data["safe_horizon"]["relex linear"] >= 3 and data["probe_safe_horizon"]["relex linear"] >= 3
    assert main(["extrapolate", *io, "--auto", *probe, "--target", "24", "--out", str(tmp_path / "out")]) == 0
    meta = strict_json((tmp_path / "out" / "step-24" / "relex.json").read_text())
    assert meta["auto"]["space"] == "function" and meta["auto"]["safe_horizon"] >= 2 and meta["auto"]["probe"]
    assert main(["analyze", *io, *probe, "--json", str(tmp_path / "an.json")]) == 0
    assert main(["report", *io, *probe, "--out", str(tmp_path / "report")]) == 0
    analyzed = strict_json((tmp_path / "an.json").read_text())
    reported = strict_json((tmp_path / "report" / "report.json").read_text())
    assert analyzed["space"] == reported["space"] == "function" and analyzed["verdict"] == reported["verdict"]
    assert "in function space" in analyzed["verdict"]
    assert "Function-space backtest" in (tmp_path / "report" / "report.md").read_text()


def test_probe_prompts_file(tmp_path):
    from relex.analysis.probe import read_prompts
    from relex.errors import RelexError

    (tmp_path / "p.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": "3+4="}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["1+2=", "3+4="]
    (tmp_path / "bad.jsonl").write_text('{"question": "1+2="}\n{"prompt": "3+4="}\n')
    with pytest.raises(RelexError, match="bad.jsonl:1: .*'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    assert main(["extrapolate", "--base", str(tmp_path), "--probe", str(tmp_path / "p.jsonl"), "--target", "9",
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
