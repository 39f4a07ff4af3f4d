"""The lab: fast unit checks of its parts, then one end-to-end `relex lab --profile ci` run on real files."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from relex.lab.report import early_gain, rl_gain  # noqa: E402
from relex.lab.tasks import TASKS, Addition, Multiplication, make_task  # noqa: E402
from relex.lab.tokenizer import build_tokenizer  # noqa: E402


# -- tasks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_heldout_is_fixed_and_never_sampled(name: str) -> None:
    task = make_task(name, digits=2, heldout_size=300)
    again = make_task(name, digits=2, heldout_size=300)
    assert task.heldout == again.heldout  # independent of any lab seed
    assert len({p.prompt for p in task.heldout}) == 300
    rng = random.Random(0)
    drawn = task.sample_many(5000, rng)
    assert not any(task.is_heldout(p.prompt) for p in drawn)


def test_addition_and_multiplication_answers() -> None:
    add = Addition(digits=3, heldout_size=50)
    for p in add.heldout:
        a, b = p.prompt.rstrip("=").split("+")
        assert len(a) == len(b) == 3 and int(p.answer) == int(a) + int(b)
    mul = Multiplication(digits=3, heldout_size=50)
    for p in mul.heldout:
        a, d = p.prompt.rstrip("=").split("*")
        assert int(p.answer) == int(a) * int(d) and 2 <= int(d) <= 9


def test_paired_difference_against_stopping() -> None:
    """Two models that agree on most problems: the paired SE is the SE of the per-problem differences."""
    from relex.eval.scoring import Score

    stop = Score((True,) * 30 + (False,) * 70)
    method = Score((True,) * 28 + (False, False) + (True,) * 6 + (False,) * 64)  # 6 gains, 2 losses
    mean, se = method.minus(stop)
    assert (method.correct, method.total) == (34, 100) and math.isclose(mean, 0.04)
    diffs = [1] * 6 + [-1] * 2 + [0] * 92
    var = sum((d - 0.04) ** 2 for d in diffs) / 99
    assert math.isclose(se, math.sqrt(var / 100)) and se < method.stderr  # tighter: they agree on 92 of 100
    assert stop.minus(stop) == (0.0, 0.0) and method.as_dict()["outcomes"].count("1") == 34
    with pytest.raises(ValueError, match="same problems"):
        method.minus(Score((True,)))


def test_verifier_is_the_reward() -> None:
    task = Addition(digits=2, heldout_size=10)
    assert task.verify(" 42 ", "42") and not task.verify("420", "42") and not task.verify("", "42")
    assert task.reward(completions=["42", "41", "42\n"], answer=["42", "42", "42"], trainer_state=None) == [1.0, 0.0, 1.0]


def test_heldout_too_large_is_refused() -> None:
    with pytest.raises(ValueError):
        Addition(digits=1, heldout_size=60)
    with pytest.raises(ValueError):
        make_task("subtraction", digits=2)


# -- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer(Addition.alphabet)
    text = "07+35=42"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids + [loaded.eos_token_id, loaded.pad_token_id], skip_special_tokens=True) == text
    batch = loaded(["1+2=", "12+34="], padding=True)["input_ids"]
    assert batch[0][0] == loaded.pad_token_id  # left padding, for batched generation


def test_model_sizes_match_profiles() -> None:
    from relex.lab.model import build_model, count_parameters
    from relex.lab.profiles import PROFILES

    tok = build_tokenizer(Addition.alphabet)
    assert 70_000 <= count_parameters(build_model(PROFILES["ci"].shape, tok, 0)) <= 80_000
    assert 750_000 <= count_parameters(build_model(PROFILES["default"].shape, tok, 0)) <= 850_000


def test_relative_weight_error(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from relex.lab.weights import relative_weight_error

    w0 = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    real = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([[5.0, 1.0], [1.0, 1.0]])}
    pred = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": real["b"].clone()}
    pred["b"][1, 1] += 1.0
    for name, tensors in {"base": w0, "real": real, "pred": pred}.items():
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    err = relative_weight_error(tmp_path / "pred", tmp_path / "real", tmp_path / "base")
    assert math.isclose(err, 1.0 / 5.0, rel_tol=1e-6)  # ||pred-real|| = 1, ||real-w0|| = sqrt(9+16)


def test_cutoff_steps() -> None:
    from relex.lab.lab import cutoff_steps

    assert cutoff_steps((0.15, 0.20), 60) == [9, 12]
    assert cutoff_steps((0.15, 0.20), 90) == [14, 18]
    assert cutoff_steps((0.15, 0.20), 500) == [75, 100]
    assert cutoff_steps((0.01,), 10) == [2]


# -- end to end ----------------------------------------------------------------------------------
def _relex(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "relex", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def ci_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "ci"
    proc = _relex("lab", "--profile", "ci", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ci_lab_end_to_end(ci_lab: Path) -> None:
    from transformers import AutoModelForCausalLM

    report = json.loads((ci_lab / "report.json").read_text())
    assert (ci_lab / "report.md").read_text().startswith("# relex lab")
    assert (ci_lab / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(ci_lab.parent.glob(".ci.relex-*"))

    last = report["T"]
    steps = sorted(int(p.name.split("-")[1]) for p in (ci_lab / "run").glob("checkpoint-*"))
    assert steps == list(range(1, last + 1))  # k=1: every step saved, TRL layout
    for step in steps:
        AutoModelForCausalLM.from_pretrained(ci_lab / "run" / f"checkpoint-{step}")

    # RLVR beats the base by well over the combined standard error early in the run (first third). The `ci`
    # profile is sized so that this holds with margin on every CPU kernel set, thread count and seed measured
    # (benchmarks/lab_spread.py; docs/lab.md has the table), not only on one machine's trajectory.
    base = report["curve"][0]
    assert base["method"] == "base" and 0.15 <= base["accuracy"] <= 0.5
    gain = early_gain(report)
    assert gain > 3.0, f"best early gain is only {gain:.2f} standard errors"

    # Every extrapolated output exists, loads, was evaluated, and has a weight error where a real one exists.
    extrap = [r for r in report["rows"] if r["method"] not in ("base", "rlvr")]
    assert {r["method"] for r in extrap} == {"relex", "two-point"}
    assert {(r["cutoff"], r["step"]) for r in extrap} == {(c, t) for c in report["cutoffs"] for t in (last, 2 * last)}
    for r in extrap:
        AutoModelForCausalLM.from_pretrained(ci_lab / r["path"])
        assert 0.0 <= r["accuracy"] <= 1.0 and r["stderr"] >= 0.0
        assert (r["weight_error"] is not None) == (r["step"] == last)
        if r["weight_error"] is not None:
            assert math.isfinite(r["weight_error"]) and r["weight_error"] >= 0
        # paired to its cutoff checkpoint over the same problems: the mean difference is the accuracy difference
        stop = next(x for x in report["rows"] if x["method"] == "rlvr" and x["step"] == r["cutoff"])
        assert len(r["outcomes"]) == len(stop["outcomes"]) == report["task"]["heldout_size"]
        assert r["outcomes"].count("1") == round(r["accuracy"] * len(r["outcomes"]))
        assert r["vs_stop"] == pytest.approx(r["accuracy"] - stop["accuracy"], abs=1e-12)
        assert r["vs_stop_stderr"] >= 0 and stop["vs_stop"] is None


@pytest.fixture(scope="module")
def ci_lora_lab(ci_lab: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`relex lab --profile ci --lora`, started from the ci lab's base (same seed: the same model) to skip pre-training."""
    out = tmp_path_factory.mktemp("lab") / "ci-lora"
    proc = _relex("lab", "--profile", "ci", "--lora", "--base", str(ci_lab / "base"), "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ci_lora_lab_end_to_end(ci_lora_lab: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from relex.cli import main
    from relex.eval.scoring import load_model
    from relex.trajectory.peft import is_adapter_folder

    report = json.loads((ci_lora_lab / "report.json").read_text())
    assert report["lora"]["rank"] == 8 and report["lora"]["alpha"] == 16
    assert 0 < report["lora"]["trainable_parameters"] < report["model"]["parameters"]
    assert report["rl"]["lr_used"] == report["rl"]["lora_lr"]
    assert "**LoRA run**: rank 8, alpha 16" in (ci_lora_lab / "report.md").read_text()

    last = report["T"]
    run = ci_lora_lab / "run"
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == list(range(1, last + 1))
    for step in range(1, last + 1):  # adapter only: no full weights in any checkpoint
        folder = run / f"checkpoint-{step}"
        assert is_adapter_folder(folder) and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
    # a checkpoint loads in transformers on its own (its adapter config points at the published base)
    # and merged onto the base, as the lab evaluates it
    final = run / f"checkpoint-{last}"
    AutoModelForCausalLM.from_pretrained(final)
    merged = load_model(final, ci_lora_lab / "base")
    assert not hasattr(merged, "peft_config")

    gain = rl_gain(report)
    assert gain > 3.0, f"LoRA GRPO's best gain is only {gain:.2f} standard errors"
    assert all(math.isfinite(m["norm"]) and m["norm"] > 0 for m in report["drift"])

    extrap = [r for r in report["rows"] if r["method"] not in ("base", "rlvr")]
    assert {r["method"] for r in extrap} == {"relex", "two-point"}
    for r in extrap:
        AutoModelForCausalLM.from_pretrained(ci_lora_lab / r["path"])
        if r["step"] == last:
            assert math.isfinite(r["weight_error"]) and r["weight_error"] > 0

    # relex eval merges an adapter folder onto --base; same greedy answers as the lab's own evaluation
    assert main(["eval", str(final), "--base", str(ci_lora_lab / "base"), "--profile", "ci", "--score-only"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(report["curve"][-1]["accuracy"])
    assert main(["eval", str(final), "--profile", "ci", "-q"]) == 2
    assert "--base" in capsys.readouterr().err


def _check_predict_extend(out: Path, lab: Path, window: int, horizon: int, rounds: int, lora: bool) -> dict:
    """What every predict-extend output must hold: M_r folders that load, rounds that add up, honest savings."""
    from transformers import AutoModelForCausalLM

    from relex.lab.predict_extend import first_step_reaching
    from relex.trajectory.peft import is_adapter_folder

    doc = json.loads((out / "report.json").read_text())
    assert not list(out.parent.glob(f".{out.name}.relex-*"))
    assert [r["real_steps"] for r in doc["results"]] == [window * r for r in range(1, rounds + 1)]
    assert [r["effective_step"] for r in doc["results"]] == [(window + horizon) * r for r in range(1, rounds + 1)]
    assert len({r["seed"] for r in doc["results"]}) == rounds  # a new data seed every round
    plain = {c["step"]: c["accuracy"] for c in doc["plain_curve"]}
    lab_curve = {c["step"]: c["accuracy"] for c in json.loads((lab / "report.json").read_text())["curve"]}
    assert all(plain[s] == a for s, a in lab_curve.items())  # the lab's own scores, refined, never changed
    for r in doc["results"]:
        AutoModelForCausalLM.from_pretrained(out / r["model"])
        assert 0.0 <= r["accuracy"] <= 1.0 and r["stderr"] >= 0
        first = first_step_reaching(plain, r["accuracy"])
        assert r["plain_first_step_reaching"] == first
        assert r["steps_saved"] == (None if first is None else first - r["real_steps"])
        if first:  # exact to the step: the step before the first crossing was scored and is below
            assert plain[first - 1] < r["accuracy"]
    for r in range(2, rounds + 1):
        run = out / f"round-{r}" / "run"
        assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, window + 1)]
        assert all(is_adapter_folder(p) == lora for p in run.glob("checkpoint-*"))
    md = (out / "report.md").read_text()
    assert md.startswith("# relex predict-extend") and md.count("\n| ") == rounds + 1
    return doc


@pytest.mark.slow
def test_predict_extend_on_the_lora_lab(ci_lora_lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from relex.cli import main

    out = tmp_path / "pe"
    args = ["predict-extend", "--lab-dir", str(ci_lora_lab), "--method", "relex", "--window", "3", "--horizon", "3",
            "--rounds", "2", "--out", str(out), "-q"]
    assert main(args) == 0
    doc = _check_predict_extend(out, ci_lora_lab, 3, 3, 2, lora=True)
    assert doc["lora"]["rank"] == 8 and doc["results"][0]["method_params"]["cutoff"] == 3

    assert main(args) == 2  # an existing --out is refused, on one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main([*args[:-3], "--out", str(tmp_path / "other"), "--window", "999", "-q"]) == 2
    assert "beyond the lab run's last step" in capsys.readouterr().err
    assert main(["predict-extend", "--lab-dir", str(tmp_path), "--window", "3", "--horizon", "3",
                 "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "not a lab output folder" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_extend_on_the_full_lab(ci_lab: Path, tmp_path: Path) -> None:
    from relex.lab.predict_extend import run_predict_extend

    out = run_predict_extend(ci_lab, "two-point", window=2, horizon=2, rounds=2, out=tmp_path / "pe", quiet=True)
    doc = _check_predict_extend(out, ci_lab, 2, 2, 2, lora=False)
    assert doc["lora"] is None and doc["method"] == "two-point"


def test_relative_weight_error_of_an_adapter(tmp_path: Path) -> None:
    """An adapter checkpoint is measured as base + B @ A * alpha / r."""
    import torch
    from safetensors.torch import save_file

    from relex.lab.weights import relative_weight_error

    w0 = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 3)}
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0], [0.0]])  # B @ A: one entry, 1.0
    for name in ("base", "real", "pred"):
        (tmp_path / name).mkdir()
    save_file(w0, str(tmp_path / "base" / "model.safetensors"))
    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": b},
              str(tmp_path / "real" / "adapter_model.safetensors"))
    (tmp_path / "real" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    pred = torch.zeros(2, 3)
    pred[0, 0] = 2.0 + 0.5  # real is 2.0 (scale alpha / r = 2)
    save_file({"model.layers.0.mlp.up_proj.weight": pred}, str(tmp_path / "pred" / "model.safetensors"))
    err = relative_weight_error(tmp_path / "pred", tmp_path / "real", tmp_path / "base")
    assert math.isclose(err, 0.5 / 2.0, rel_tol=1e-12)


@pytest.mark.slow
def test_eval_cli_and_refusals(ci_lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from relex.cli import main

    report = json.loads((ci_lab / "report.json").read_text())
    out = tmp_path / "scores.json"
    base, relex_out = ci_lab / "base", ci_lab / next(r["path"] for r in report["rows"] if r["method"] == "relex")
    assert main(["eval", str(base), str(relex_out), "--profile", "ci", "--json", str(out)]) == 0
    assert str(relex_out) in capsys.readouterr().out
    scores = json.loads(out.read_text())["scores"]
    assert scores[str(base)]["accuracy"] == report["curve"][0]["accuracy"]  # same held-out set, same greedy answers
    assert set(scores[str(relex_out)]) >= {"accuracy", "stderr", "correct", "total"}

    assert main(["lab", "--profile", "ci", "--out", str(ci_lab), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(["eval", str(tmp_path), "--digits", "2", "-q"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_logits_extrapolation_and_score_only(ci_lab: Path, capsys: pytest.CaptureFixture) -> None:
    """alpha=1 decodes exactly like the cutoff model alone; --score-only prints bare numbers."""
    from relex.cli import main

    report = json.loads((ci_lab / "report.json").read_text())
    cut = ci_lab / "run" / f"checkpoint-{report['cutoffs'][0]}"
    assert main(["eval", str(cut), "--profile", "ci", "--score-only",
                 "--logits-extrapolate", str(ci_lab / "base"), str(cut), "--alpha", "1"]) == 0
    alone, combined = (float(line) for line in capsys.readouterr().out.split())
    assert combined == alone
    assert main(["eval", "--logits-extrapolate", str(ci_lab / "base"), str(cut), "--profile", "ci", "-q"]) == 2
    assert "--alpha" in capsys.readouterr().err
