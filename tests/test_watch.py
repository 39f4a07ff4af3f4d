"""`relex watch` beside a run being written: slow and incomplete checkpoints, rotation, restart, clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import drift_run, max_relative_error, numpy_relex, predicted_deltas, save_pico_model
from relex.cli import main
from relex.errors import RelexError
from relex.live import Watcher

STEPS = [2, 4, 6, 8, 10, 12]
POLL, SETTLE = 0.05, 0.3


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL)


def status_of(out: Path) -> dict:
    try:
        return json.loads((out / "watch.json").read_text())
    except (OSError, ValueError):
        return {}


def taken(out: Path, step: int) -> bool:
    return step in status_of(out).get("window", []) or step in status_of(out).get("on_disk", [])


def write_slowly(src: Path, dst: Path, pause: float) -> None:
    """Copy a checkpoint folder the way a trainer writes in place: config first, weights in two bursts."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    data = (src / "model.safetensors").read_bytes()
    with open(dst / "model.safetensors", "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(pause)
        handle.write(data[len(data) // 2:])


def test_watch_follows_a_run_being_written(tmp_path: Path) -> None:
    base = save_pico_model(tmp_path / "base")
    staged = tmp_path / "staged"
    ckpts = drift_run(base, staged, steps=STEPS, layout="plain")
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    cmd = [sys.executable, "-m", "relex", "watch", "--base", str(base), "--run", str(run), "--target", "20",
           "--out", str(out), "--poll", str(POLL), "--settle", str(SETTLE), "--cache", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[BaseException] = []

    def trainer() -> None:
        try:
            shutil.copytree(staged / "step_2", run / "step_2")
            write_slowly(staged / "step_4", run / "step_4", pause=3 * SETTLE)  # stalls longer than --settle
            incomplete = run / "step_7"  # a checkpoint whose writer died: half a file, forever
            incomplete.mkdir()
            shutil.copy(staged / "step_6" / "config.json", incomplete / "config.json")
            (incomplete / "model.safetensors").write_bytes((staged / "step_6" / "model.safetensors").read_bytes()[:100])
            for step in (6, 8, 10):
                shutil.copytree(staged / f"step_{step}", run / f"step_{step}")
            wait_for(lambda: taken(out, 10), what="step 10")
            shutil.rmtree(run / "step_2")  # save_total_limit rotates the oldest away
            shutil.copytree(staged / "step_12", run / "step_12")
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    writer = threading.Thread(target=trainer)
    writer.start()
    try:
        # every checkpoint taken (one torn by a read while half-written is taken again at a later poll)
        wait_for(lambda: status_of(out).get("step") == 12 and status_of(out).get("checkpoints_taken") == 6
                 and (out / "step-20" / "relex.json").is_file()
                 and json.loads((out / "step-20" / "relex.json").read_text())["observed_steps"][-1] == 12,
                 what="the prediction from step 12, every checkpoint taken")
    finally:
        writer.join()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert not errors, errors
    assert proc.returncode == 0, stderr
    assert "stopped after 6 checkpoint(s)" in stderr
    assert "step 12" in stdout and "verdict:" in stdout

    status = status_of(out)
    assert 7 not in status["window"] + status["on_disk"]
    assert status["checkpoints_taken"] == 6  # 2 stays taken after its rotation ...
    assert status["window"] == [4, 6, 8, 10, 12]  # ... but its products with 12 are unknown
    assert status["on_disk"] == [4, 6, 8, 10, 12]
    assert status["safe_horizon"] is None or status["safe_horizon"] >= 1
    meta = json.loads((out / "step-20" / "relex.json").read_text())
    assert meta["observed_steps"] == [4, 6, 8, 10, 12] and meta["watch"]["step"] == 12
    w0 = load_file(str(base / "model.safetensors"))
    reference = numpy_relex(w0, ckpts, [4, 6, 8, 10, 12], 20)
    assert max_relative_error(predicted_deltas(out / "step-20", base), reference) < 1e-5
    assert not [p for p in out.rglob(".*") if ".relex-" in p.name]


def test_watcher_resumes_from_cache_and_keeps_rotated_statistics(tmp_path: Path, monkeypatch) -> None:
    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    drift_run(base, run, steps=[2, 4, 6, 8, 10, 12, 14], layout="trl")
    cache = tmp_path / "cache"
    first = Watcher(base, run, cache=cache, settle=0.0)
    assert first.poll() == [2, 4, 6, 8, 10, 12, 14]
    assert first.status is not None and first.status["safe_horizon"] is not None and "verdict" in first.status
    gram = dict(first.grams)

    import relex.live.watcher as watcher_module

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache covers every checkpoint: nothing should be read")

    monkeypatch.setattr(watcher_module, "compute_stats", no_reading)
    again = Watcher(base, run, targets=[40], out=tmp_path / "out", cache=cache, settle=0.0)
    assert again.poll() == [2, 4, 6, 8, 10, 12, 14]
    for name in gram:
        np.testing.assert_array_equal(again.grams[name], gram[name])
    monkeypatch.undo()

    shutil.rmtree(run / "checkpoint-2")  # rotated away, then a new checkpoint arrives
    drift_run(base, tmp_path / "later", steps=[16], layout="trl")
    shutil.copytree(tmp_path / "later" / "checkpoint-16", run / "checkpoint-16")
    assert again.poll() == [16]
    assert again.steps[0] == 2 and again.window_steps() == [4, 6, 8, 10, 12, 14, 16]
    grams = next(iter(again.grams.values()))
    assert np.isnan(grams[0, -1]) and np.isfinite(grams[1:, 1:]).all()
    early = again.stats([2, 4, 6])  # statistics of the rotated checkpoint stay usable where they are known
    assert all(np.isfinite(s.gram).all() for s in early.values())
    assert json.loads((tmp_path / "out" / "step-40" / "relex.json").read_text())["observed_steps"][-1] == 16
    for step in again.window_steps()[1:]:
        shutil.rmtree(run / f"checkpoint-{step}")
    with pytest.raises(RelexError, match="fewer than two checkpoints"):
        again.write()


def test_watch_refuses_an_out_it_does_not_own(tmp_path: Path, pico, capsys) -> None:
    base, run, _ = pico
    out = tmp_path / "out"
    (out / "step-50").mkdir(parents=True)
    args = ["watch", "-q", "--base", str(base), "--run", str(run), "--target", "50", "--out", str(out), "--once",
            "--no-cache"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "step-50" / "relex.json").read_text())["observed_steps"] == [2, 3, 5, 8, 13, 21]
    assert main(args) == 0  # its own outputs: replaced without --overwrite
    assert set(os.listdir(out)) == {"step-50", "watch.json"}


def test_verl_checkpoints_wait_for_the_tracker_file(tmp_path: Path) -> None:
    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    drift_run(base, run, steps=[5, 10, 15], layout="verl")
    watcher = Watcher(base, run, settle=3600.0)  # no settling within the test: only the tracker can say complete
    assert watcher.poll() == []
    (run / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert watcher.poll() == [5, 10]
    (run / "latest_checkpointed_iteration.txt").write_text("15\n")
    assert watcher.poll() == [15] and watcher.status["window"] == [5, 10, 15]
