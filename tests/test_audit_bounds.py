"""Issue #28's bounds: huge step numbers, sizes and thread counts, argparse's usage dumps, bad dataset lines, moved
integer buffers, a dead Ray address and outputs that would replace an input; each ends as one line and exit 2."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_pico_model
from relex.cli import main
from relex.methods.trends import fit_trend
from relex.stats.fitting import fit_line

NEAR_BOUND = 10**15 - 100  # a shift that keeps every step of the pico run below the bound


def refused(capsys, *argv) -> str:
    """Run the CLI in-process; assert one line on stderr and exit 2; return the line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("relex: error: ") and "\n" not in err, err
    return err


def extrapolate_args(base: Path, run: Path, out: Path, *extra) -> list:
    return ["extrapolate", "-q", "--no-cache", "--base", base, "--run", run, "--out", out, *extra]


# 1. step numbers


def test_a_step_beyond_the_bound_in_a_folder_name_is_refused(pico, tmp_path, capsys):
    base, run, _ = pico
    huge = run / f"checkpoint-{10**200 + 21}"
    (run / "checkpoint-21").rename(huge)
    err = refused(capsys, *extrapolate_args(base, run, tmp_path / "out", "--target", 40))
    assert huge.name in err and "10**15" in err
    assert not (tmp_path / "out").exists()


def test_a_5000_digit_checkpoint_step_is_one_line(pico, tmp_path, capsys):
    base, run, _ = pico  # Python refuses int() of more than 4300 digits: the length is read first
    err = refused(capsys, "extrapolate", "--base", base, "--checkpoint", f"{'9' * 5000}={run / 'checkpoint-21'}",
                  "--checkpoint", f"3={run / 'checkpoint-3'}", "--target", 40, "--out", tmp_path / "out", "--no-cache")
    assert "--checkpoint" in err and "10**15" in err and len(err) < 400


def test_a_target_beyond_the_bound_is_refused(pico, tmp_path, capsys):
    base, run, _ = pico
    err = refused(capsys, *extrapolate_args(base, run, tmp_path / "out", "--target", 10**200))
    assert "--target" in err and "10**15" in err


@pytest.mark.parametrize("trend", ["linear", "quadratic"])
def test_the_line_fit_is_exact_for_steps_near_the_bound(trend):
    t = np.array([2.0, 3, 5, 8, 13, 21])
    y = 0.05 * t + 0.1 + 0.01 * np.sin(t)
    near = fit_trend(trend, t + NEAR_BOUND, y)(np.array([40.0, 80.0]) + NEAR_BOUND)
    np.testing.assert_allclose(near, fit_trend(trend, t, y)(np.array([40.0, 80.0])), rtol=1e-12)
    slope, intercept = fit_line(t, y)
    assert slope == pytest.approx(np.polyfit(t, y, 1)[0], rel=1e-12)
    assert intercept == pytest.approx(np.polyfit(t, y, 1)[1], rel=1e-12)


def test_shifted_steps_write_the_same_weights(pico, tmp_path, capsys):
    base, run, _ = pico
    assert main([str(a) for a in extrapolate_args(base, run, tmp_path / "small", "--target", 40)]) == 0
    pairs = [f"{NEAR_BOUND + int(p.name.split('-')[1])}={p}" for p in run.iterdir()]
    args = [a for pair in pairs for a in ("--checkpoint", pair)]
    assert main([str(a) for a in ["extrapolate", "-q", "--no-cache", "--base", base, *args,
                                  "--out", tmp_path / "near", "--target", NEAR_BOUND + 40]]) == 0
    small = load_file(str(tmp_path / "small" / "step-40" / "model.safetensors"))
    near = load_file(str(tmp_path / "near" / f"step-{NEAR_BOUND + 40}" / "model.safetensors"))
    assert all(torch.equal(small[n], near[n]) for n in small)


# 2. sizes, threads and argparse's errors


@pytest.mark.parametrize("flag", ["--memory-budget", "--max-shard-size"])
def test_a_400_digit_size_is_one_line(pico, tmp_path, capsys, flag):
    base, run, _ = pico
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in extrapolate_args(base, run, tmp_path / "out", "--target", 40, flag, "9" * 400)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and err.startswith("relex: error: ") and flag in err


def test_too_many_threads_is_one_line(pico, tmp_path, capsys):
    base, run, _ = pico
    err = refused(capsys, *extrapolate_args(base, run, tmp_path / "out", "--target", 40, "--threads", 100000))
    assert "--threads 100000" in err


@pytest.mark.parametrize("argv", [["extrapolate", "--threads", "many"], ["no-such-command"], ["analyze"]])
def test_argparse_errors_are_one_line_with_a_hint(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and err.startswith("relex: error: ") and "--help" in err


# 3. relex eval --dataset


@pytest.fixture
def eval_model(tmp_path: Path) -> Path:
    pytest.importorskip("trl")
    pytest.importorskip("math_verify")
    return save_pico_model(tmp_path / "model")


@pytest.mark.parametrize(("line", "message"), [
    (b'{"prompt": "\xff1+2=", "answer": "3"}', "not UTF-8"),
    (b'{"prompt": "1+2=", "answer": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"prompt": "  ", "answer": "3"}', "empty 'prompt'"),
    (b'{"prompt": "1+2=", "answer": null}', "'answer'"),
    (b'{"prompt": "1+2=", "answer": ""}', "'answer'"),
    (b'{"prompt": "1+2=", "answer": true}', "'answer'"),
    (b'{"prompt": "' + b"1" * 4_000_000 + b'", "answer": "3"}', "context"),
])
def test_a_bad_dataset_line_is_named(eval_model, tmp_path, capsys, line, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "answer": 2}\n\n' + line + b"\n")
    err = refused(capsys, "eval", eval_model, "--dataset", data, "-q")
    assert f"{data}:3:" in err and message in err


def test_numeric_answers_are_read_as_text(eval_model, tmp_path):
    from relex.eval.dataset import read_dataset

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "1/2=", "answer": 0.5}\n')
    assert [item.answer for item in read_dataset(data)] == ["2", "0.5"]


def test_a_truncated_model_is_named(eval_model, tmp_path, capsys):
    weights = eval_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert str(weights) in refused(capsys, "eval", eval_model, "--dataset", data, "-q")
    assert str(weights) in refused(capsys, "eval", eval_model, "--digits", "1", "-q")  # the lab's own task too


# 4. integer buffers


def test_a_moved_integer_buffer_is_warned_about_once(pico, tmp_path, caplog):
    base, run, _ = pico
    for folder in [base, *run.iterdir()]:
        value = 7 if folder.name == "checkpoint-21" else 0
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        tensors["counter"] = torch.tensor([1, 2, value])
        tensors["mask"] = torch.tensor([True, value == 0])
        save_file(tensors, str(path), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        assert main([str(a) for a in ["extrapolate", "--no-cache", "--base", base, "--run", run,
                                      "--target", 40, "--target", 60, "--out", tmp_path / "out"]]) == 0
    [warning] = [r.getMessage() for r in caplog.records if "base's values" in r.getMessage()]
    assert "2 integer or bool tensor(s)" in warning and "counter" in warning and "mask" in warning
    written = load_file(str(tmp_path / "out" / "step-40" / "model.safetensors"))
    assert written["counter"].tolist() == [1, 2, 0]


# 5. a dead Ray address


def test_a_dead_ray_address_is_refused_at_once(pico, tmp_path, capsys):
    pytest.importorskip("ray")
    base, run, _ = pico
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = refused(capsys, *extrapolate_args(base, run, tmp_path / "out", "--target", 40, "--executor", "ray",
                                            "--ray-address", f"127.0.0.1:{port}"))
    assert f"--ray-address 127.0.0.1:{port}" in err and "nothing answers" in err


# 6. outputs that would replace an input


def test_a_target_folder_that_is_a_checkpoint_is_refused(pico, tmp_path, capsys):
    base, run, _ = pico
    for folder in run.iterdir():
        folder.rename(run / folder.name.replace("checkpoint-", "step-"))
    before = (run / "step-21" / "model.safetensors").read_bytes()
    err = refused(capsys, *extrapolate_args(base, run, run, "--cutoff", 13, "--target", 21, "--overwrite"))
    assert "step-21" in err and "--checkpoint" in err
    assert (run / "step-21" / "model.safetensors").read_bytes() == before


def test_a_target_folder_that_holds_the_base_is_refused(pico, tmp_path, capsys):
    _, run, _ = pico
    base = save_pico_model(tmp_path / "out" / "step-40")
    capsys.readouterr()  # save_pretrained's progress bar
    err = refused(capsys, *extrapolate_args(base, run, tmp_path / "out", "--target", 40, "--overwrite"))
    assert "--base" in err and (base / "model.safetensors").is_file()


def test_a_report_over_the_run_is_refused(pico, capsys):
    base, run, _ = pico
    err = refused(capsys, "report", "-q", "--no-cache", "--base", base, "--run", run, "--out", run, "--overwrite")
    assert "--run" in err and (run / "checkpoint-21" / "model.safetensors").is_file()


@pytest.mark.parametrize(("command", "flag"), [("analyze", "--json"), ("backtest", "--plot")])
def test_an_output_file_inside_a_model_folder_is_refused(pico, capsys, command, flag):
    base, run, _ = pico
    config = base / "config.json"
    before = config.read_bytes()
    err = refused(capsys, command, "-q", "--no-cache", "--base", base, "--run", run, flag, config)
    assert flag in err and config.read_bytes() == before
    weights = run / "checkpoint-21" / "model.safetensors"
    assert flag in refused(capsys, command, "-q", "--no-cache", "--base", base, "--run", run, flag, weights)
