"""Every bad input ends in one clear line on stderr, exit code 2, and no output folder left behind."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import drift_run, save_pico_model
from relex.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["extrapolate", "-q", "--no-cache", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def edit_checkpoint(folder, **changes) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path))


@pytest.fixture
def cli(pico, tmp_path, capsys):
    """Run ``relex extrapolate`` on the pico run; asserts the error shape, returns the message."""
    base, run, _ = pico
    out = tmp_path / "out"

    def call(*extra: str, cutoff: int = 21, target: int = 40, expect: int = 2, base_dir=None) -> str:
        code, err = run_cli(capsys, "--base", base_dir or base, "--run", run, "--cutoff", cutoff,
                            "--target", target, "--out", out, *extra)
        assert code == expect, err
        if expect == 2:
            assert err.startswith("relex: error: ") and "\n" not in err
            assert not out.exists() or not any(out.iterdir())
            assert not [p for p in tmp_path.rglob(".*relex-tmp*")]
        return err

    return call, base, run


NAME = "model.layers.0.mlp.up_proj.weight"


def test_shape_mismatch_names_file_and_tensor(cli):
    call, _, run = cli
    edit_checkpoint(run / "checkpoint-5", **{NAME.replace(".", "__"): torch.zeros(3, 3)})
    err = call()
    assert "checkpoint-5/model.safetensors" in err and NAME in err and "shape" in err


def test_dtype_mismatch(cli):
    call, _, run = cli
    t = load_file(str(run / "checkpoint-8" / "model.safetensors"))[NAME]
    edit_checkpoint(run / "checkpoint-8", **{NAME.replace(".", "__"): t.to(torch.bfloat16)})
    err = call()
    assert "checkpoint-8" in err and NAME in err and "dtype" in err


def test_missing_and_extra_tensor_names(cli):
    call, _, run = cli
    edit_checkpoint(run / "checkpoint-3", **{NAME.replace(".", "__"): None})
    assert NAME in call() and "missing" in call()
    edit_checkpoint(run / "checkpoint-3", **{NAME.replace(".", "__"): torch.zeros(32, 16), "extra__weight": torch.zeros(2)})
    err = call()
    assert "extra.weight" in err and "not in the base" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_checkpoint(cli, bad):
    call, _, run = cli
    t = load_file(str(run / "checkpoint-13" / "model.safetensors"))[NAME]
    t[1, 2] = bad
    edit_checkpoint(run / "checkpoint-13", **{NAME.replace(".", "__"): t})
    err = call()
    assert "checkpoint-13" in err and NAME in err and "NaN or Inf" in err


def test_nan_in_the_base_blames_the_base(cli):
    call, base, _ = cli
    t = load_file(str(base / "model.safetensors"))[NAME]
    t[0, 0] = float("nan")
    edit_checkpoint(base, **{NAME.replace(".", "__"): t})
    err = call()
    assert "base/model.safetensors" in err and "NaN" in err


def test_truncated_safetensors(cli):
    call, _, run = cli
    path = run / "checkpoint-5" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    err = call()
    assert "checkpoint-5/model.safetensors" in err and "corrupt or truncated" in err


def test_garbage_safetensors(cli):
    call, _, run = cli
    (run / "checkpoint-5" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "corrupt or truncated" in call()


def test_duplicate_steps(cli):
    call, _, run = cli
    shutil.copytree(run / "checkpoint-5", run / "step_5")
    err = call()
    assert "step 5" in err and "also claimed" in err


def test_fewer_than_two_observed(cli):
    call, _, _ = cli
    err = call(cutoff=2)
    assert "a line needs at least two" in err


def test_cutoff_below_first_step(cli):
    call, _, _ = cli
    assert "below the first checkpoint step 2" in call(cutoff=1)


@pytest.mark.parametrize("target", [0, -5])
def test_target_must_be_positive(cli, target):
    call, _, _ = cli
    assert "must be a positive step" in call(target=target)


@pytest.mark.parametrize("command", ["extrapolate", "analyze"])
def test_threads_must_be_positive(pico, tmp_path, capsys, command):
    base, run, _ = pico
    output = ["--target", "40", "--out", str(tmp_path / "out")] if command == "extrapolate" else []
    code = main([command, *output, "--base", str(base), "--run", str(run), "--threads", "0", "-q"])
    assert (code, capsys.readouterr().err.strip()) == (2, "relex: error: --threads 0 must be >= 1")


def test_base_without_config(cli):
    call, base, _ = cli
    (base / "config.json").unlink()
    assert "no config.json" in call()


def test_base_without_tokenizer_warns_and_continues(pico, tmp_path, caplog):
    base, run, _ = pico
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    with caplog.at_level(logging.WARNING):
        assert main(["extrapolate", "--no-cache", "--base", str(base), "--run", str(run), "--target", "30",
                     "--out", str(tmp_path / "out")]) == 0
    assert "no tokenizer files" in caplog.text
    assert (tmp_path / "out" / "step-30" / "model.safetensors").is_file()


def test_pickle_refused_unless_allowed(tmp_path, capsys):
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", steps=[1, 2, 3])
    ckpt = tmp_path / "run" / "checkpoint-2"
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    args = ["--base", base, "--run", tmp_path / "run", "--target", 9, "--out", tmp_path / "out"]
    code, err = run_cli(capsys, *args)
    assert code == 2 and "pytorch_model.bin" in err and "--allow-pickle" in err
    code, err = run_cli(capsys, *args, "--allow-pickle")
    assert code == 0, err
    assert (tmp_path / "out" / "step-9" / "model.safetensors").is_file()


def test_existing_output_refused_then_replaced(pico, tmp_path, capsys):
    base, run, _ = pico
    args = ["--base", base, "--run", run, "--target", 30, "--out", tmp_path / "out"]
    assert run_cli(capsys, *args)[0] == 0
    marker = tmp_path / "out" / "step-30" / "relex.json"
    before = marker.read_bytes()
    code, err = run_cli(capsys, *args, "--cutoff", 8)
    assert code == 2 and "output exists" in err and "--overwrite" in err
    assert marker.read_bytes() == before
    assert run_cli(capsys, *args, "--cutoff", 8, "--overwrite")[0] == 0
    assert marker.read_bytes() != before


def test_verl_step_without_hf_weights(tmp_path, capsys):
    base = save_pico_model(tmp_path / "base")
    (tmp_path / "run" / "global_step_5" / "actor").mkdir(parents=True)
    code, err = run_cli(capsys, "--base", base, "--run", tmp_path / "run", "--target", 9, "--out", tmp_path / "o")
    assert code == 2 and "global_step_5" in err and "model_merger" in err
