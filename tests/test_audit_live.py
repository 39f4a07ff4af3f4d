"""Issue 28, the live part: `relex watch` and RelexCallback against the run they follow going wrong under them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import safe_open

from conftest import drift_run, save_pico_model
from relex.cli import main
from relex.errors import RelexError
from relex.live import Watcher
import relex.live.watcher as watcher_module


def within(seconds: float, work, unblock: Path | None = None):
    """``work()``'s result, failing (not hanging) if it takes longer; ``unblock``: a FIFO a stuck reader waits on."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            with open(unblock, "w"):  # lets a reader blocked in open() go on (and see EOF)
                pass
        raise AssertionError(f"still running after {seconds} s")
    return result[0] if result else None


def hyphen_run(base: Path, run: Path, steps: list[int], staged: Path) -> None:
    """A run whose trainer names its checkpoints ``step-N/``, like relex names its predictions."""
    drift_run(base, staged, steps=steps, layout="plain")
    run.mkdir(exist_ok=True)
    for step in steps:
        shutil.copytree(staged / f"step_{step}", run / f"step-{step}")


def warnings_of(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


# -- 1. a real checkpoint in --out is never replaced -------------------------------------------------------------
def test_watch_refuses_an_out_holding_a_real_checkpoint_at_the_target(tmp_path: Path) -> None:
    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    hyphen_run(base, run, [2, 4, 6, 8], tmp_path / "staged")
    for overwrite in (False, True):
        with pytest.raises(RelexError, match=r"step-8.*checkpoint"):
            Watcher(base, run, targets=[8], out=run, settle=0.0, cache=False, overwrite=overwrite)
    before = (run / "step-8" / "model.safetensors").read_bytes()
    assert main(["watch", "-q", "--base", str(base), "--run", str(run), "--target", "8", "--out", str(run), "--once",
                 "--no-cache", "--overwrite"]) == 2
    assert (run / "step-8" / "model.safetensors").read_bytes() == before
    with pytest.raises(RelexError, match="would replace"):  # --out/step-T would be the run itself
        Watcher(base, tmp_path / "step-5", targets=[5], out=tmp_path, cache=False)


@pytest.mark.parametrize("how", ["in place", "fresh folder"])
def test_watch_takes_the_trainers_own_step_at_a_target_and_stops_predicting_it(tmp_path: Path, caplog,
                                                                                how: str) -> None:
    base = save_pico_model(tmp_path / "base")
    run, staged = tmp_path / "run", tmp_path / "staged"
    hyphen_run(base, run, [2, 4, 6, 8], staged)
    drift_run(base, tmp_path / "later", steps=[12, 14], layout="plain")
    caplog.set_level(logging.INFO)
    watcher = Watcher(base, run, targets=[12, 16], out=run, settle=0.0, cache=False)
    assert any("is the run folder" in m for m in warnings_of(caplog, "relex.live.watcher"))
    assert watcher.poll() == [2, 4, 6, 8]
    assert (run / "step-12" / "relex.json").is_file()

    real = tmp_path / "later" / "step_12"
    if how == "in place":  # save_pretrained into the existing folder: our relex.json stays beside its weights
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(real / name, run / "step-12" / name)
    else:
        shutil.rmtree(run / "step-12")
        shutil.copytree(real, run / "step-12")
    trainers = (real / "model.safetensors").read_bytes()
    assert watcher.poll() == [12]
    assert watcher.targets == [16]
    assert any("step-12" in m and "never replaced" in m for m in warnings_of(caplog, "relex.live.watcher"))
    assert not (run / "step-12" / "relex.json").exists()
    shutil.copytree(tmp_path / "later" / "step_14", run / "step-14")
    assert watcher.poll() == [14]
    assert (run / "step-12" / "model.safetensors").read_bytes() == trainers
    assert json.loads((run / "step-16" / "relex.json").read_text())["observed_steps"] == [2, 4, 6, 8, 12, 14]


# -- 2. FIFOs and devices where small files are expected ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_verl_tracker_that_is_not_a_regular_file_neither_hangs_nor_counts(tmp_path: Path, kind: str) -> None:
    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    drift_run(base, run, steps=[5, 10], layout="verl")
    tracker = run / "latest_checkpointed_iteration.txt"
    os.mkfifo(tracker) if kind == "fifo" else tracker.symlink_to("/dev/zero")
    watcher = Watcher(base, run, settle=3600.0, cache=False)
    assert within(10, watcher.poll, tracker if kind == "fifo" else None) == []
    tracker.unlink()
    tracker.write_text("10\n")
    assert watcher.poll() == [5, 10]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_watch_json_that_is_not_a_regular_file_neither_hangs_nor_is_written_through(tmp_path: Path, pico,
                                                                                    kind: str) -> None:
    base, run, _ = pico
    out = tmp_path / "out"
    out.mkdir()
    status = out / "watch.json"
    os.mkfifo(status) if kind == "fifo" else status.symlink_to("/dev/zero")
    unblock = status if kind == "fifo" else None

    def start(overwrite: bool):
        try:
            return Watcher(base, run, targets=[30], out=out, settle=0.0, cache=False, overwrite=overwrite)
        except RelexError as exc:
            return exc

    assert "--overwrite" in str(within(10, lambda: start(False), unblock))
    watcher = within(10, lambda: start(True), unblock)
    assert within(30, watcher.poll, unblock) == [2, 3, 5, 8, 13, 21]
    assert status.is_file() and not status.is_symlink()
    assert json.loads(status.read_text())["step"] == 21


# -- 3. a checkpoint rewritten while it is read ------------------------------------------------------------------
def test_checkpoint_rewritten_during_its_read_is_discarded_and_read_again(tmp_path: Path, pico, monkeypatch,
                                                                           caplog) -> None:
    base, run, _ = pico
    cache = tmp_path / "cache"
    drift_run(base, tmp_path / "other", steps=[21], seed=7)
    rewritten = tmp_path / "other" / "checkpoint-21" / "model.safetensors"
    real_compute = watcher_module.compute_stats

    def rewrite_during_read(traj, **kwargs):
        stats = real_compute(traj, **kwargs)
        if 21 in traj.steps and not rewrite_during_read.done:  # the trainer saves step 21 again meanwhile
            rewrite_during_read.done = True
            shutil.copyfile(rewritten, run / "checkpoint-21" / "model.safetensors")
        return stats

    rewrite_during_read.done = False
    monkeypatch.setattr(watcher_module, "compute_stats", rewrite_during_read)
    caplog.set_level(logging.INFO)
    watcher = Watcher(base, run, cache=cache, settle=0.0)
    assert watcher.poll() == [2, 3, 5, 8, 13]
    assert any("changed while" in m for m in warnings_of(caplog, "relex.live.watcher"))
    with safe_open(str(next(cache.glob("stats-*.safetensors"))), framework="pt") as entry:
        assert "21" not in json.loads(entry.metadata()["checkpoints"])  # nothing of that read was cached
    assert watcher.poll() == [21]

    fresh = Watcher(base, run, cache=False, settle=0.0)
    fresh.poll()
    for name, gram in fresh.grams.items():
        assert abs(watcher.grams[name] - gram).max() <= 1e-12 * abs(gram).max(), name
    served = Watcher(base, run, cache=cache, settle=0.0)  # what a later command gets from the shared cache
    monkeypatch.setattr(watcher_module, "compute_stats", lambda *a, **k: pytest.fail("served from the cache"))
    served.poll()
    for name, gram in fresh.grams.items():
        assert abs(served.grams[name] - gram).max() <= 1e-12 * abs(gram).max(), name


# -- 4. the callback never stops training ------------------------------------------------------------------------
def test_callback_warns_once_and_carries_on_when_its_out_becomes_unwritable(tmp_path: Path, caplog) -> None:
    from relex.integrations.trl import RelexCallback

    base = save_pico_model(tmp_path / "base")
    run, out = tmp_path / "run", tmp_path / "out"
    drift_run(base, tmp_path / "staged", steps=[2, 3, 5, 8])
    run.mkdir()
    args = SimpleNamespace(output_dir=str(run), world_size=1)
    callback = RelexCallback(base=base, out=out, cache=False)
    callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    caplog.set_level(logging.INFO)
    for step in (2, 3, 5, 8):
        shutil.copytree(tmp_path / "staged" / f"checkpoint-{step}", run / f"checkpoint-{step}")
        if step == 5:  # the disk holding out/ fills up, is remounted read-only, is taken away ...
            shutil.rmtree(out)
            out.write_text("not a folder any more")
        callback.on_save(args, SimpleNamespace(global_step=step), None)
    warned = warnings_of(caplog, "relex.integrations.trl")
    assert len(warned) == 1 and str(out) in warned[0] and "training goes on" in warned[0]
    assert callback.watcher is not None and callback.watcher.steps == [2, 3, 5, 8]


# -- 5. the newest checkpoint rotated away before it is read ----------------------------------------------------
def rotate_after_listing(monkeypatch, folder: Path) -> None:
    """The trainer removes ``folder`` (save_total_limit) right after the watcher listed it as ready."""
    listed = Watcher.ready

    def ready_then_rotated(self: Watcher):
        found = listed(self)
        shutil.rmtree(folder, ignore_errors=True)
        return found

    monkeypatch.setattr(Watcher, "ready", ready_then_rotated)


@pytest.mark.parametrize("when", ["before its read", "during its read"])
def test_checkpoint_rotated_away_before_it_is_read_is_skipped(tmp_path: Path, pico, monkeypatch, caplog,
                                                              when: str) -> None:
    base, run, _ = pico
    gone = run / "checkpoint-21"
    if when == "before its read":
        rotate_after_listing(monkeypatch, gone)
    else:
        real_compute = watcher_module.compute_stats

        def rotate_first(traj, **kwargs):
            if 21 in traj.steps:
                shutil.rmtree(gone, ignore_errors=True)
            return real_compute(traj, **kwargs)

        monkeypatch.setattr(watcher_module, "compute_stats", rotate_first)
    caplog.set_level(logging.INFO)
    watcher = Watcher(base, run, cache=False, settle=0.0)
    assert watcher.poll() == [2, 3, 5, 8, 13]
    assert any("step 21" in m and "skipped" in m for m in warnings_of(caplog, "relex.live.watcher"))
    assert watcher.poll() == [] and watcher.status["step"] == 13


def test_watch_once_exits_0_when_the_newest_checkpoint_vanishes(tmp_path: Path, pico, monkeypatch) -> None:
    base, run, _ = pico
    rotate_after_listing(monkeypatch, run / "checkpoint-21")
    assert main(["watch", "-q", "--base", str(base), "--run", str(run), "--once", "--no-cache"]) == 0


# -- 6. numbers argparse must check -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--poll", "-1"), ("--poll", "0"), ("--poll", "nan"), ("--poll", "1e300"),
                                         ("--poll", "inf"), ("--settle", "-1"), ("--settle", "nan"),
                                         ("--settle", "inf"), ("--every", "0"), ("--every", "-3"), ("--every", "x"),
                                         ("--window", "1"), ("--target", "0")])
def test_watch_refuses_bad_numbers_in_one_line(tmp_path: Path, capsys, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["watch", "--base", str(tmp_path), "--run", str(tmp_path), "--once", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("relex: error: ") and flag in err, err


# -- 7. a run folder not there yet --------------------------------------------------------------------------------
def test_watch_says_once_that_it_waits_for_a_missing_run_folder(tmp_path: Path, pico, caplog) -> None:
    base, run, _ = pico
    later = tmp_path / "later"
    watcher = Watcher(base, later, cache=False, settle=0.0)
    for _ in range(3):
        assert watcher.poll() == []
    warned = warnings_of(caplog, "relex.live.watcher")
    assert len(warned) == 1 and str(later) in warned[0] and "waiting" in warned[0]
    shutil.copytree(run, later)
    assert watcher.poll() == [2, 3, 5, 8, 13, 21]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RelexError, match="a-file: .*not a folder"):
        Watcher(base, tmp_path / "a-file", cache=False)


# -- 8. one safe horizon for watch and analyze --------------------------------------------------------------------
def hand_rows() -> list[dict]:
    """A setting best at 8x that already fails at 1.5x, and one that holds up to 4x: the older rule (choose at 8x,
    then its horizon) says 1x where the setting supported furthest says 4x."""
    rows = []
    for h in (1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
        rows.append({"horizon": h, "setting": "far", "relative_error": 0.1, "error_vs_stay": 1.2})
        rows.append({"horizon": h, "setting": "steady", "relative_error": 0.2 if h <= 4 else 0.9,
                     "error_vs_stay": 0.5 if h <= 4 else 1.5})
    return rows


def test_watch_and_analyze_give_the_same_safe_horizon(tmp_path: Path, pico, monkeypatch) -> None:
    from relex.analysis import overview
    from relex.analysis.backtest import HORIZONS, best_supported, choose, safe_horizon

    base, run, _ = pico
    rows = hand_rows()
    assert safe_horizon(rows, choose(rows, HORIZONS[-1])) == 1.0 and best_supported(rows) == ("steady", 4.0)
    report = tmp_path / "analyze.json"
    monkeypatch.setattr(overview, "backtest", lambda stats: hand_rows())
    assert main(["analyze", "-q", "--base", str(base), "--run", str(run), "--no-cache", "--json", str(report)]) == 0
    watcher = Watcher(base, run, cache=False, settle=0.0)
    watcher.poll()
    analysis = json.loads(report.read_text())
    assert analysis["safe_horizon"] == watcher.status["safe_horizon"] == 4.0
    assert analysis["chosen"] == watcher.status["chosen"] == "steady"
    assert watcher.status["safe_step"] == 4 * 21

    monkeypatch.undo()  # and on the run's own backtest
    assert main(["analyze", "-q", "--base", str(base), "--run", str(run), "--no-cache", "--json", str(report)]) == 0
    watcher = Watcher(base, run, cache=False, settle=0.0)
    watcher.poll()
    analysis = json.loads(report.read_text())
    assert (analysis["safe_horizon"], analysis["chosen"]) == (watcher.status["safe_horizon"],
                                                              watcher.status["chosen"])
