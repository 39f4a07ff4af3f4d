"""Issue #28, publishing: one atomic-publish helper for every writer, a sweep that knows which machine and
container a temporary belongs to, outputs that are never replaced unless they are the command's own, and
bad caches and score files that end as a cache miss or one line instead of a traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, safe_open, save_file

from conftest import drift_run, save_pico_model
from relex import tempfiles
from relex.cli import main
from relex.errors import RelexError
from relex.tempfiles import building, place, sweep, temp_path


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> tuple[Path, Path]:
    """A pico base and drift run, shared by this module's tests (none of them writes into it)."""
    root = tmp_path_factory.mktemp("pico")
    base = save_pico_model(root / "base")
    drift_run(base, root / "run")
    return base, root / "run"


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*relex-*"))


def cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err.strip()


def report(capsys, run_files, out: Path, *extra) -> tuple[int, str]:
    base, run = run_files
    return cli(capsys, "report", "-q", "--base", base, "--run", run, "--cutoff", 8, "--no-cache", "--out", out, *extra)


# 1. one publish helper ---------------------------------------------------------------------------------
def test_building_publishes_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(KeyError):
        with building(out) as tmp:
            assert tmp == temp_path(out) and tmp.is_dir()
            raise KeyError("interrupted")
    assert not (tmp_path / "a").exists()  # no temporary, and no parents made for it

    with building(out, layout=("report.json",)) as tmp:
        (tmp / "report.json").write_text("1")
    with building(out, overwrite=True, layout=("report.json",)) as tmp:
        (tmp / "report.json").write_text("2")
    assert snapshot(out) == {"report.json": b"2"} and temporaries(tmp_path) == []

    with pytest.raises(RelexError, match="output exists; pass --overwrite"):
        with building(out, layout=("report.json",)):
            pass
    file = tmp_path / "stats.bin"
    for text in ("old", "new"):
        with building(file, overwrite=True, folder=False) as tmp:
            tmp.write_text(text)
    assert file.read_text() == "new" and temporaries(tmp_path) == []


def test_pretrained_conversion_builds_under_the_shared_temporary(tmp_path, monkeypatch):
    from relex.lab import pretrained

    monkeypatch.setenv("RELEX_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "gguf_path", lambda model: tmp_path / "model.gguf")
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.parent.mkdir()
    abandoned = temp_path(target).with_name(temp_path(target).name.rsplit("-", 1)[0] + f"-{dead_pid()}")
    abandoned.mkdir()

    def convert(gguf: Path, out: Path) -> None:
        assert out == temp_path(target) and not abandoned.exists()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "convert", convert)
    assert pretrained.ensure_model("smollm2-135m", quiet=True) == target
    assert snapshot(target) == {"config.json": b"{}"} and temporaries(tmp_path) == []


# 2. the sweep knows the machine and container ---------------------------------------------------------
def test_sweep_judges_only_this_places_temporaries(tmp_path, caplog):
    pid = dead_pid()
    host, key = place().split(".")
    mine = tmp_path / f".a.relex-tmp-{place()}-{pid}"
    before = tmp_path / f".b.relex-tmp-{pid}"  # an earlier version's name: this place's
    other_host = tmp_path / f".c.relex-tmp-otherhost.{key}-{pid}"
    other_container = tmp_path / f".d.relex-tmp-{host}.{'0' * 8 if key != '0' * 8 else '1' * 8}-{pid}"
    aside = tmp_path / f".e.relex-old-otherhost.{key}-{pid}"
    for path in (mine, before, other_host, other_container, aside):
        path.mkdir()
    day_old = os.stat(other_host).st_mtime - 2 * tempfiles.STALE_SECONDS
    os.utime(other_host, (day_old, day_old))
    with caplog.at_level(logging.WARNING, logger="relex.tempfiles"):
        sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, other_container.name, aside.name])
    assert [r.getMessage() for r in caplog.records if "otherhost" in r.getMessage()] == [
        f"{other_host}: left 48 hours ago by relex on otherhost (another machine or container); "
        "remove it by hand if that run is over"]


# 3. an output is replaced only when it is the command's own --------------------------------------------
def test_report_overwrite_never_replaces_a_folder_that_is_not_a_report(run_files, tmp_path, capsys):
    _, run = run_files
    before = snapshot(run)
    code, err = report(capsys, run_files, run, "--overwrite")
    assert code == 2 and "\n" not in err and snapshot(run) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my own notes")
    (notes / "todo.txt").write_text("keep")
    code, err = report(capsys, run_files, notes, "--overwrite")
    assert code == 2 and err == (f"relex: error: {notes}: not a relex report output (it holds todo.txt); "
                                 "refusing to replace it, choose another --out")
    assert snapshot(notes) == {"report.md": b"my own notes", "todo.txt": b"keep"}

    out = tmp_path / "report"
    assert report(capsys, run_files, out) == (0, "")
    first = snapshot(out)
    assert report(capsys, run_files, out, "--overwrite") == (0, "")
    assert snapshot(out).keys() == first.keys() and temporaries(tmp_path) == []


def test_lab_and_predict_extend_never_replace_their_inputs_or_foreign_folders(run_files, tmp_path, capsys):
    base, run = run_files
    before = snapshot(run)
    code, err = cli(capsys, "lab", "-q", "--out", run, "--overwrite")
    assert code == 2 and err == (f"relex: error: {run}: not a relex lab output (it holds checkpoint-13); "
                                 "refusing to replace it, choose another --out")
    code, err = cli(capsys, "lab", "-q", "--out", base.parent, "--base", base, "--overwrite")
    assert code == 2 and "would replace" in err and "(--base)" in err
    code, err = cli(capsys, "predict-extend", "-q", "--lab-dir", run, "--out", run, "--window", 2, "--horizon", 2,
                    "--overwrite")
    assert code == 2 and "would replace" in err and "(--lab-dir)" in err
    assert snapshot(run) == before


# 4. a killed backtest's scratch model is swept --------------------------------------------------------
def test_backtest_scratch_is_named_for_the_sweep(run_files, tmp_path, monkeypatch):
    from relex import Trajectory
    from relex.analysis import backtest_eval

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = tmp_path / f".relex-backtest.relex-tmp-{place()}-{dead_pid()}"
    (killed / "model").mkdir(parents=True)
    written = []

    def extrapolate(method, out, targets, **options):
        assert out.parent == temp_path(tmp_path / "relex-backtest") and not killed.exists()
        written.append(out)
        return [out]

    monkeypatch.setattr(backtest_eval, "extrapolate", extrapolate)
    monkeypatch.setattr(backtest_eval, "run_evaluator", lambda command, folder: 0.5)
    rows = [{"setting": "two-point", "prefix_end": 5}]
    real = backtest_eval.score_backtest(Trajectory.discover(*run_files).observed(8), rows, ["two-point"], "eval",
                                        cache=False)
    assert real == {"step": 8, "accuracy": 0.5} and rows[0]["accuracy"] == 0.5 and written
    assert list(tmp_path.iterdir()) == []


# 5. a cache entry that parses but does not fit is a miss ----------------------------------------------
def _rewrite(entry: Path, change) -> None:
    with safe_open(str(entry), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(entry))
    change(tensors, meta)
    save_file(tensors, str(entry), metadata=meta)


def _first(tensors: dict) -> str:
    return sorted(tensors)[0]


SPOILERS = {
    "gram of the wrong shape": lambda t, m: t.update({_first(t): t[_first(t)][:-1]}),
    "gram of one dimension": lambda t, m: t.update({_first(t): t[_first(t)].flatten()}),
    "gram in float32": lambda t, m: t.update({_first(t): t[_first(t)].float()}),
    "gram in bfloat16": lambda t, m: t.update({_first(t): t[_first(t)].bfloat16()}),
    "a key that is not a gram": lambda t, m: t.update({"stray": t[_first(t)].clone()}),
    "checkpoints not an object": lambda t, m: m.update(checkpoints="[1, 2]"),
    "steps not integers": lambda t, m: m.update(checkpoints=json.dumps({"x": [], **json.loads(m["checkpoints"])})),
    "no checkpoints entry": lambda t, m: m.pop("checkpoints"),
    "base not JSON": lambda t, m: m.update(base="{"),
}


@pytest.mark.parametrize("spoil", SPOILERS, ids=list(SPOILERS))
def test_a_cache_entry_that_does_not_fit_is_recomputed(run_files, tmp_path, spoil, caplog):
    from relex import Trajectory
    from relex.materialize import compute_stats

    traj = Trajectory.discover(*run_files).observed(8)
    cache = tmp_path / "cache"
    fresh = compute_stats(traj, cache=cache, progress=False)
    [entry] = cache.glob("stats-*.safetensors")
    _rewrite(entry, SPOILERS[spoil])
    with caplog.at_level(logging.WARNING, logger="relex.stats.cache"):
        again = compute_stats(traj, cache=cache, progress=False)
    assert again.keys() == fresh.keys()
    assert all(np.array_equal(again[n].gram, fresh[n].gram) for n in fresh)
    assert any("statistics cache" in r.getMessage() for r in caplog.records)


# 6. a scores file of the wrong shape is one line -------------------------------------------------------
BAD_SCORES = {
    "a list": ([0.1, 0.2], "the top level is a list"),
    "flat steps": ({"10": 0.5}, '"10" is a number'),
    "a step that is not an integer": ({"real": {"ten": 0.5}}, 'step "ten" of "real" is not an integer'),
    "a score that is not a number": ({"real": {"10": "high"}}, 'the score of step 10 of "real" is not a finite number'),
    "a boolean score": ({"real": {"10": True}}, 'the score of step 10 of "real" is not a finite number'),
    "an empty series": ({"real": {}}, '"real" has no steps'),
}


@pytest.mark.parametrize("case", BAD_SCORES, ids=list(BAD_SCORES))
def test_scores_of_the_wrong_shape_are_one_line(case):
    from relex.analysis.report import check_scores

    scores, problem = BAD_SCORES[case]
    with pytest.raises(RelexError) as caught:
        check_scores(scores, Path("scores.json"))
    assert str(caught.value) == ('scores.json: expected accuracy by step for each series, '
                                 '{"real": {"STEP": accuracy, ...}, ...}; ' + problem)
    good = {"real": {"2": 0.1, "8": 0.25}, "relex": {"16": 0.5}}
    assert check_scores(good, Path("scores.json")) is good


def test_report_refuses_scores_of_the_wrong_shape_before_any_work(run_files, tmp_path, capsys):
    base, run = run_files
    bad = tmp_path / "scores.json"
    bad.write_text(json.dumps({"10": 0.5}))
    code = main(["report", "--base", str(base), "--run", str(run), "--out", str(tmp_path / "rep"), "--scores", str(bad),
                 "--no-cache", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "scores.json: expected accuracy by step" in err
    assert not (tmp_path / "rep").exists()
