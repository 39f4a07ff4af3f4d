"""End to end: the real ``relex`` command in a subprocess, on real files in a fake TRL run."""

from __future__ import annotations

import json
import subprocess
import sys

from relex.trajectory import CheckpointReader


def relex(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relex", *map(str, args)], capture_output=True, text=True)


def test_extrapolate_and_analyze_end_to_end(pico, tmp_path):
    base, run, _ = pico
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    done = relex("extrapolate", "--base", base, "--run", run, "--cutoff", 13, "--target", 50, "--target", 100,
                 "--out", out, "--max-shard-size", "8KB", "--dtype", "bfloat16", "--cache", cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / "step-50"), str(out / "step-100")]
    assert "relex -> 2 target(s)" in done.stderr  # a progress bar was shown
    assert f"relex eval {run / 'checkpoint-13'} {out / 'step-50'} --dataset" in done.stderr  # the check to run next
    for step in (50, 100):
        folder = out / f"step-{step}"
        assert (folder / "model.safetensors.index.json").is_file()
        assert {s.dtype for s in CheckpointReader(folder).specs.values()} == {__import__("torch").bfloat16}
        meta = json.loads((folder / "relex.json").read_text())
        assert meta["target"] == step and meta["params"] == {"rank": 1, "cutoff": 13, "trend": "linear", "anchor": 0, "shrink": 1.0}
        assert 0.9 < meta["trajectory_summary"]["explained_var_rank1"]["median"] <= 1.0

    report = tmp_path / "report.json"
    done = relex("analyze", "--base", base, "--run", run, "--cutoff", 8, "--compare", "--json", report,
                 "--cache", cache, "--threads", 1, "-q")
    assert done.returncode == 0, done.stderr
    assert "Trajectory summary" in done.stdout and "Worst" in done.stdout
    data = json.loads(report.read_text())
    assert data["observed_steps"] == [2, 3, 5, 8]
    assert [row["step"] for row in data["alignment"]] == [13, 21]
    assert all(row["mean_cosine"] > 0.99 for row in data["alignment"])
    assert len(data["tensors"]) == data["summary"]["tensors"] > 20

    done = relex("extrapolate", "--base", base, "--run", run, "--cutoff", 8, "--reconstruct", "--rank", 2,
                 "--out", tmp_path / "rec", "--no-cache", "-q")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["step-2", "step-3", "step-5", "step-8"]


def test_bad_input_exit_code_from_the_real_command(tmp_path):
    done = relex("extrapolate", "--base", tmp_path / "nope", "--run", tmp_path, "--target", 5, "--out", tmp_path / "o")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"relex: error: {tmp_path}: no checkpoints found (expected "
                                                "checkpoint-N/, global_step_N/, global_stepN_hf/, step-N/ or "
                                                "step_N/ folders)"]


def test_a_profiler_still_writes_its_file_after_the_fast_exit(pico, tmp_path):
    """extrapolate ends without the interpreter's teardown, except under a profiler, which writes at exit."""
    base, run, _ = pico
    profile = tmp_path / "extrapolate.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "relex", "extrapolate",
                           "--base", str(base), "--run", str(run), "--cutoff", "13", "--target", "50",
                           "--out", str(tmp_path / "out"), "--no-cache", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert profile.stat().st_size > 0 and (tmp_path / "out" / "step-50" / "relex.json").is_file()
