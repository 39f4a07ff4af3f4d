"""Diagnostics, backtest and --auto on synthetic trajectories with known structure."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import drift_run, save_pico_model
from relex import Relex, Trajectory, extrapolate
from relex.analysis.auto import auto_method
from relex.analysis.backtest import backtest, choose, default_settings, safe_horizon
from relex.analysis.diagnostics import diagnose, verdict
from relex.cli import main
from relex.errors import RelexError
from relex.stats import TensorStats
from relex.stats.updates import idle_steps

STEPS = np.arange(1, 41, dtype=np.float64)


def trajectory(kind: str, seed: int = 0, d: int = 300) -> np.ndarray:
    """T x d deltas: a straight drift, a sqrt-growing drift, a turning direction, or a random walk."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(d), rng.standard_normal(d)
    noise = 0.02 * rng.standard_normal((len(STEPS), d))
    if kind == "linear":
        return 0.1 * np.outer(STEPS, a) + noise
    if kind == "sqrt":
        return np.outer(np.sqrt(STEPS), a) + noise
    if kind == "rotating":
        angle = STEPS / STEPS[-1] * np.pi / 2
        return 0.1 * STEPS[:, None] * (np.cos(angle)[:, None] * a + np.sin(angle)[:, None] * b)
    return np.cumsum(rng.standard_normal((len(STEPS), d)), axis=0)


def stats_of(kind: str) -> dict[str, TensorStats]:
    return {f"t{i}": TensorStats(STEPS, (m := trajectory(kind, seed=i)) @ m.T) for i in range(3)}


def test_diagnostics_tell_the_four_kinds_apart():
    diag = {k: diagnose(stats_of(k)) for k in ("linear", "sqrt", "rotating", "walk")}
    growth = {k: d["whole_model"]["growth_exponent"] for k, d in diag.items()}
    assert growth["linear"] == pytest.approx(1.0, abs=0.05) and growth["sqrt"] == pytest.approx(0.5, abs=0.05)
    assert growth["walk"] < 0.7
    null = diag["walk"]["random_walk"]
    assert null["rank1_share"]["mean"] == pytest.approx(0.81, abs=0.03)  # the random walk's known scores
    assert null["r2_linear"]["mean"] == pytest.approx(0.96, abs=0.02)
    walk = diag["walk"]["median"]
    assert abs(walk["r2_linear"] - null["r2_linear"]["mean"]) < 4 * null["r2_linear"]["std"] + 0.02
    assert diag["linear"]["median"]["path_efficiency"] > 0.9 > 0.3 > diag["walk"]["median"]["path_efficiency"]
    assert diag["rotating"]["median"]["direction_drift_cos"] < 0.9 < diag["linear"]["median"]["direction_drift_cos"]
    assert "like a random walk" in verdict(diag["walk"], 1.0) and "no extrapolation" in verdict(diag["walk"], 1.0)
    assert "grows linearly" in verdict(diag["linear"], 4.0) and "4x" in verdict(diag["linear"], 4.0)
    # a supported horizon says what it means: closer to the run's future than the cutoff, not better than it
    for space in ("weight", "function"):
        assert "not scoring better" in verdict(diag["linear"], 4.0, space=space)
    assert "not scoring better" not in verdict(diag["walk"], 1.0) + verdict(diag["walk"], None)


def adam_run(no_gradient: set[int], tiny_gradient: set[int], seed: int, steps: int = 16) -> TensorStats:
    """Gram statistics of a real torch Adam run on a noisy regression; the steps in ``no_gradient`` get a
    zero gradient (GRPO's all-equal rewards) and those in ``tiny_gradient`` 1e-4 of it (its KL term alone)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()]).double()  # noqa: E731
    w0, teacher = flat(), torch.randn(32, 8, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    deltas = []
    for step in range(1, steps + 1):
        x = torch.randn(4, 32, generator=gen)
        loss = ((model(x) - x @ teacher - torch.randn(4, 8, generator=gen)) ** 2).mean()
        scale = 0.0 if step in no_gradient else 1e-4 if step in tiny_gradient else 1.0
        opt.zero_grad()
        (scale * loss).backward()
        opt.step()
        deltas.append((flat() - w0).numpy())
    m = np.stack(deltas)
    return TensorStats(np.arange(1.0, steps + 1), m @ m.T)


@pytest.mark.parametrize("seed", range(3))
def test_idle_steps_of_a_real_adam_run_are_flagged_and_only_they(seed):
    """No gradient at step 1: the checkpoint equals theta_0; no (or a tiny) gradient later: Adam coasts on its
    momentum along the previous update. The verdict names them; gradient steps and synthetic runs are not flagged."""
    stats = adam_run({1, 5, 6, 11}, {12}, seed)
    assert idle_steps(stats) == {"stalled": [1], "coasting": [5, 6, 11, 12]}
    diag = diagnose({"w": stats.subset([1, 2, 3, 4, 5, 6])})
    line = verdict(diag, None)
    assert "Warning: checkpoint 1 did not move" in line and "steps 5 and 6 repeat the direction" in line
    assert "The window holds 3 updates with a gradient of their own." in line
    assert "holds 2 updates with a gradient of their own; its straightness says nothing" in verdict(
        diagnose({"w": stats.subset([1, 4, 5, 6])}), None)
    short = verdict(diagnose({"w": stats.subset([1, 2])}), None)  # the LLM ci lab's window: one step moved
    assert "nan" not in short and "cannot measure" in short and "cannot be compared" in short
    assert idle_steps(adam_run(set(), set(), seed)) == {"stalled": [], "coasting": []}
    for kind in ("linear", "rotating", "walk"):  # (sqrt's first two updates, nearly noiseless, look like coasting)
        diag = diagnose(stats_of(kind))
        assert diag["idle"] == {"stalled": [], "coasting": []} and "Warning" not in verdict(diag, 2.0), kind


@pytest.mark.parametrize("kind, allowed", [("linear", {"relex linear", "relex power", "relex linear, rank 2"}),
                                           ("sqrt", {"relex power"})])
def test_auto_chooses_the_right_family(kind, allowed):
    """A straight drift keeps a line (power with p near 1 is the same curve); sqrt growth takes the power law."""
    rows = backtest(stats_of(kind))
    label = choose(rows, 2.0)
    assert label in allowed
    assert safe_horizon(rows, label) >= 4


def test_auto_takes_a_later_window_for_a_turning_direction_and_refuses_a_random_walk():
    rows = backtest(stats_of("rotating"))
    assert "anchor@50%" in choose(rows, 2.0)
    walk = backtest(stats_of("walk"))
    assert safe_horizon(walk, choose(walk, 2.0)) == 1.0
    with pytest.raises(RelexError, match="beyond the 1x the backtest supports"):
        auto_method(stats_of("walk"), [80], cutoff=None)
    method, targets, record = auto_method(stats_of("walk"), [80], cutoff=None, force=True)
    assert targets == [80] and record["forced"]


def test_backtest_errors_from_gram_equal_errors_from_weights():
    m = trajectory("sqrt", d=50)
    stats = TensorStats(STEPS, m @ m.T)
    rows = backtest({"w": stats})
    for row in rows[:12]:
        setting = next(s for s in default_settings() if s.label == row["setting"])
        prefix = [int(s) for s in STEPS if s <= row["prefix_end"]]
        w = setting.build(prefix).weights(stats.subset(prefix), [row["target"]])[0]
        pred, real = w @ m[: len(prefix)], m[row["target"] - 1]
        stay = m[len(prefix) - 1]
        assert row["relative_error"] == pytest.approx(np.linalg.norm(pred - real) / np.linalg.norm(real), rel=1e-8)
        assert row["error_vs_stay"] == pytest.approx(np.linalg.norm(pred - real) / np.linalg.norm(stay - real),
                                                     rel=1e-8)
        cos = pred @ real / np.linalg.norm(pred) / np.linalg.norm(real)
        assert row["cosine"] == pytest.approx(cos, rel=1e-8)


def test_anchored_relex_on_files_equals_relex_on_deltas_from_the_anchor(tmp_path):
    """Window offset through the Gram equals fitting RELEX on W_t - W_a directly."""
    base = save_pico_model(tmp_path / "base")
    ckpts = drift_run(base, tmp_path / "run", steps=[1, 2, 4, 6, 9, 12], noise=0.05)
    traj = Trajectory.discover(base, tmp_path / "run")
    [folder] = extrapolate(Relex(anchor=4).fit(traj), tmp_path / "out", [30], cache=False, progress=False)
    from relex.trajectory import CheckpointReader

    reader = CheckpointReader(folder)
    name = "model.layers.0.mlp.up_proj.weight"
    later = [6, 9, 12]
    m = np.stack([(ckpts[s][name] - ckpts[4][name]).double().numpy().ravel() for s in later])
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    slope, intercept = np.polyfit(later, u[:, 0] * s[0], 1)
    expected = ckpts[4][name].double().numpy().ravel() + (slope * 30 + intercept) * vt[0]
    np.testing.assert_allclose(reader.read(name).double().numpy().ravel(), expected, rtol=1e-5, atol=1e-6)


def test_backtest_and_auto_from_the_cli(tmp_path, capsys):
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", steps=list(range(1, 17)), noise=0.02)
    io = ["--base", str(base), "--run", str(tmp_path / "run"), "--cutoff", "12", "--cache", str(tmp_path / "c"), "-q"]
    assert main(["backtest", *io, "--json", str(tmp_path / "bt.json"), "--plot", str(tmp_path / "bt.png")]) == 0
    data = json.loads((tmp_path / "bt.json").read_text())
    assert {r["horizon"] for r in data["rows"]} == {1.5, 2.0, 3.0, 4.0}
    assert (tmp_path / "bt.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["extrapolate", *io, "--auto", "--target", "24", "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "step-24" / "relex.json").read_text())
    assert meta["auto"]["chosen"] and meta["auto"]["safe_horizon"] >= 2 and meta["auto"]["backtest"]
    assert main(["extrapolate", *io, "--auto", "--target", "500", "--out", str(tmp_path / "far")]) == 2
    assert "beyond" in capsys.readouterr().err and not (tmp_path / "far").exists()
    assert main(["extrapolate", *io, "--auto", "--clip", "--target", "500", "--out", str(tmp_path / "clip")]) == 0
    [clipped] = list((tmp_path / "clip").iterdir())
    assert int(clipped.name.removeprefix("step-")) < 500


def test_report_page_with_plots(tmp_path):
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", steps=list(range(1, 15)), noise=0.02)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"real": {"1": 0.2, "7": 0.4, "14": 0.5}, "relex": {"14": 0.45}}))
    out = tmp_path / "report"
    assert main(["report", "--base", str(base), "--run", str(tmp_path / "run"), "--cutoff", "10", "--no-cache",
                 "--out", str(out), "--scores", str(scores), "-q"]) == 0
    text = (out / "report.md").read_text()
    assert "**Verdict.**" in text and "## Backtest" in text and "against real later checkpoints" in text
    for png in ("coefficients", "explained_variance", "backtest", "alignment", "accuracy"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG" and f"({png}.png)" in text
    data = json.loads((out / "report.json").read_text())
    assert [r["step"] for r in data["alignment"]] == [11, 12, 13, 14]
    assert data["coefficients"][0]["later_steps"] == [11, 12, 13, 14]


def test_backtest_scores_predictions_with_an_evaluator(tmp_path, capsys):
    """A user's evaluator command scores each evaluated prediction and the real last checkpoint."""
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", steps=list(range(1, 10)), noise=0.02)
    script = tmp_path / "score.py"
    script.write_text("import sys\nfrom safetensors.torch import load_file\n"
                      "w = load_file(sys.argv[1] + '/model.safetensors')\n"
                      "print('loaded')\nprint(float(w['model.norm.weight'].double().mean()))\n")
    report = tmp_path / "bt.json"
    code = main(["backtest", "--base", str(base), "--run", str(tmp_path / "run"), "--cache", str(tmp_path / "c"),
                 "-q", "--json", str(report), "--eval-command", f"{sys.executable} {script} {{model}}",
                 "--eval-settings", "relex linear"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    scored = [r for r in data["rows"] if "accuracy" in r]
    assert {r["setting"] for r in scored} == {"relex linear"} and len(scored) == len({r["horizon"] for r in data["rows"]})
    real = float(load_file(str(tmp_path / "run" / "checkpoint-9" / "model.safetensors"))["model.norm.weight"].double().mean())
    assert data["real"] == {"step": 9, "accuracy": pytest.approx(real)}
    assert all(abs(r["accuracy"] - real) < 0.05 * abs(real) + 0.05 for r in scored)
    bad = main(["backtest", "--base", str(base), "--run", str(tmp_path / "run"), "--no-cache", "-q",
                "--eval-command", f"{sys.executable} -c 'print(1)'"])
    assert bad == 2 and "{model}" in capsys.readouterr().err


@pytest.mark.parametrize("trend", ["linear", "quadratic", "power", "mlp"])
def test_every_trend_fits_its_window(trend):
    """Each family reproduces a smooth in-window curve it can represent (mlp: any smooth one)."""
    from relex.methods.trends import fit_trend

    t = np.arange(1.0, 21.0)
    y = {"linear": 3 * t + 1, "quadratic": 0.1 * t**2 + t, "power": 2 * t**0.5 + 1, "mlp": 2 * t**0.5 + 1}[trend]
    fitted = fit_trend(trend, t, y)
    np.testing.assert_allclose(fitted(t), y, rtol=2e-2 if trend == "mlp" else 1e-6)
    assert np.isfinite(fitted(np.array([40.0, 80.0]))).all()


def test_auto_without_cache_reads_the_checkpoints_for_statistics_once(tmp_path, monkeypatch):
    """--auto computes the Gram for its backtest and hands it to the writer: no second Gram pass."""
    from relex.materialize.stream import DeltaStream

    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", steps=list(range(1, 13)), noise=0.02)
    calls = []
    original = DeltaStream.stats
    monkeypatch.setattr(DeltaStream, "stats", lambda self, *a, **k: calls.append(a[0]) or original(self, *a, **k))
    assert main(["extrapolate", "--base", str(base), "--run", str(tmp_path / "run"), "--no-cache", "-q", "--auto",
                 "--target", "16", "--out", str(tmp_path / "out")]) == 0
    assert calls and len(calls) == len(set(calls))  # the Gram pass ran, and once per tensor


def test_extrapolate_warns_of_a_window_with_a_checkpoint_equal_to_the_base(tmp_path, caplog):
    """A first checkpoint identical to theta_0 (GRPO with all-equal rewards) is named in the log and relex.json."""
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", steps=[2, 3, 4])
    shutil.copytree(base, tmp_path / "run" / "checkpoint-1")
    with caplog.at_level("WARNING"):
        assert main(["extrapolate", "--base", str(base), "--run", str(tmp_path / "run"), "--no-cache",
                     "--target", "8", "--out", str(tmp_path / "out")]) == 0
    assert "idle steps: checkpoint 1 did not move from the one before" in caplog.text
    meta = json.loads((tmp_path / "out" / "step-8" / "relex.json").read_text())
    assert meta["trajectory_summary"]["idle_steps"] == {"stalled": [1], "coasting": []}
