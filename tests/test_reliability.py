"""Bad-input corpus for the 13 defects of issue 10 and the classes of OS error.

Each case asserts the promise: a correct result, or one line on stderr naming the file and tensor, exit
code 2, and nothing partial published (no output folder, no hidden temporary left behind).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import STEPS, drift_run, predicted_deltas, rank1_run
from relex import Relex, RelexError, Trajectory, materialize
from relex.cli import main
from relex.materialize.rounding import _odd, round_once
from relex.materialize.stream import all_finite
from relex.trajectory import CheckpointReader
from relex.trajectory import reader as reader_module
from relex.writer import ModelFolderWriter, PlannedTensor, publish_all

NAME = "model.layers.0.mlp.up_proj.weight"


def hidden(root: Path) -> list[Path]:
    """Temporaries anywhere under ``root`` (what a failed or killed run must not leave)."""
    return [p for p in root.rglob(".*") if ".relex-" in p.name]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def extrapolate(pico, tmp_path, capsys):
    """``relex extrapolate`` in-process on the pico run; ``expect=2`` asserts the whole refusal promise."""
    base, run, _ = pico

    def call(*extra, out: Path | None = None, expect: int = 0, cache: bool = False, theirs: set = frozenset()) -> str:
        """``theirs``: paths another process creates meanwhile, not counted as published."""
        out = out or tmp_path / "out"
        before = set(out.rglob("*")) if out.exists() else set()
        code = main(["extrapolate", "-q", *([] if cache else ["--no-cache"]), "--base", str(base), "--run", str(run),
                     "--out", str(out), *map(str, extra)])
        err = capsys.readouterr().err.strip()
        assert code == expect, err
        if expect == 2:
            lines = [line for line in err.splitlines() if not line.startswith("relex: WARNING")]
            assert len(lines) == 1 and lines[0].startswith("relex: error: "), err
            assert (set(out.rglob("*")) if out.exists() else set()) - set(theirs) == before  # nothing published
            assert not hidden(tmp_path)
        return err

    return call


def subprocess_relex(*args, limits: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The real command in a child process, with optional resource limits (RLIMIT_FSIZE, RLIMIT_NOFILE)."""
    def apply() -> None:
        for which, value in (limits or {}).items():
            resource.setrlimit(which, (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead

    return subprocess.run([sys.executable, "-m", "relex", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=apply, timeout=120, **kwargs)


# 1. predictions written into the run folder are never read as checkpoints -------------------------------
def test_d1_outputs_inside_the_run_are_not_checkpoints(extrapolate, pico, tmp_path, caplog):
    _, run, _ = pico
    with caplog.at_level(logging.WARNING):
        extrapolate("--cutoff", 13, "--target", 500, out=run)
    assert "inside the run folder" in caplog.text
    extrapolate("--target", 600, out=tmp_path / "o2")
    meta = json.loads((tmp_path / "o2" / "step-600" / "relex.json").read_text())
    assert meta["observed_steps"] == STEPS
    with pytest.raises(RelexError, match="prediction written by relex"):
        Trajectory.discover(pico[0], checkpoints={700: run / "step-500"})


# 2. the verdict with few checkpoints -------------------------------------------------------------------
def test_d2_verdict_of_a_straight_run_with_four_checkpoints(tmp_path, capsys):
    from conftest import save_pico_model

    base = save_pico_model(tmp_path / "base")
    rank1_run(base, tmp_path / "run", steps=[2, 4, 6, 8])
    report = tmp_path / "a.json"
    assert main(["analyze", "-q", "--no-cache", "--base", str(base), "--run", str(tmp_path / "run"),
                 "--json", str(report)]) == 0
    verdict = strict_json(report.read_text())["verdict"]
    assert "random walk (path" not in verdict and "moves straight" in verdict
    assert "too few checkpoints to backtest" in verdict and "supports no extrapolation" not in verdict


# 3. weight files resolved as transformers 5 does -------------------------------------------------------
def test_d3_model_safetensors_wins_over_a_stale_index_and_old_shards(extrapolate, pico, tmp_path):
    base, run, ckpts = pico
    folder = run / "checkpoint-8"
    stale = {NAME: torch.full_like(ckpts[8][NAME], 99.0)}
    save_file(stale, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {NAME: "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}}))
    assert torch.equal(CheckpointReader(folder).read(NAME), ckpts[8][NAME])
    extrapolate("--target", 30)  # the stale index (naming a missing shard) is ignored, as transformers does


def test_d3_index_without_model_safetensors_and_shards_without_index(pico):
    base, run, ckpts = pico
    folder = run / "checkpoint-8"
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
    (folder / "model.safetensors").unlink()
    with pytest.raises(RelexError, match="no model.safetensors.index.json naming the shards"):
        CheckpointReader(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    assert torch.equal(CheckpointReader(folder).read(NAME), ckpts[8][NAME])


# 4. an unusable cache warns and the outputs are still published ---------------------------------------
@pytest.mark.parametrize("kind", ["file", "blocked"])
def test_d4_unwritable_cache_warns_and_carries_on(extrapolate, pico, tmp_path, caplog, kind):
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("not a folder")
    else:  # the entry's name is taken by a folder: the rename fails, as on a read-only or full disk
        traj = Trajectory.discover(pico[0], pico[1])
        from relex.materialize.engine import _cache

        _cache(traj, cache).path.mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        extrapolate("--target", 30, "--cache", cache, cache=True)
    assert "statistics cache not written" in caplog.text
    assert (tmp_path / "out" / "step-30" / "model.safetensors").is_file()
    assert not hidden(tmp_path)


# 5. no file stays open between reads -------------------------------------------------------------------
def test_d5_no_file_held_open(pico):
    base, run, _ = pico
    traj = Trajectory.discover(base, run)
    model = Relex(cutoff=21).fit(traj)
    from relex.materialize import compute_stats

    compute_stats(model.trajectory_, cache=False, progress=False)
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in held if p.startswith(str(run)) or p.startswith(str(base))]


def test_d5_many_shards_under_a_low_open_file_limit(tmp_path):
    from conftest import save_pico_model

    base = save_pico_model(tmp_path / "base")
    ckpts = drift_run(base, tmp_path / "run", steps=list(range(1, 11)))
    for step, tensors in ckpts.items():  # 10 checkpoints x 24 shards = 240 files
        folder = tmp_path / "run" / f"checkpoint-{step}"
        (folder / "model.safetensors").unlink()
        names = sorted(tensors)
        files = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
        for n, f in files.items():
            save_file({n: tensors[n]}, str(folder / f))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    done = subprocess_relex("extrapolate", "-q", "--no-cache", "--base", base, "--run", tmp_path / "run",
                            "--target", 30, "--out", tmp_path / "out", limits={resource.RLIMIT_NOFILE: 160})
    assert done.returncode == 0, done.stderr


# 6. reads loop on short reads (Linux caps one preadv at 0x7ffff000 bytes) ------------------------------
def test_d6_short_reads_are_completed(pico, monkeypatch):
    _, run, ckpts = pico
    real = os.preadv

    def short(fd, buffers, offset):  # what the kernel does past 2 GiB, here past 7 bytes
        return real(fd, [memoryview(buffers[0])[:7]], offset)

    monkeypatch.setattr(reader_module.os, "preadv", short)
    assert torch.equal(CheckpointReader(run / "checkpoint-5").read(NAME), ckpts[5][NAME])


# 7. a same-size rewrite with its mtime restored misses the cache --------------------------------------
def test_d7_rewrite_with_restored_mtime_is_not_served_from_cache(extrapolate, pico, tmp_path):
    base, run, ckpts = pico
    cache = tmp_path / "cache"
    extrapolate("--target", 30, "--cache", cache, out=tmp_path / "first", cache=True)
    path = run / "checkpoint-21" / "model.safetensors"
    st = path.stat()
    changed = {n: (t.double() * 3 + 1).to(t.dtype) for n, t in ckpts[21].items()}
    save_file(changed, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    extrapolate("--target", 30, "--cache", cache, out=tmp_path / "cached", cache=True)
    extrapolate("--target", 30, out=tmp_path / "fresh")
    cached, fresh = (predicted_deltas(tmp_path / o / "step-30", base) for o in ("cached", "fresh"))
    assert all(np.array_equal(cached[n], fresh[n]) for n in fresh)


# 8. non-finite outputs are refused ---------------------------------------------------------------------
@pytest.mark.parametrize("extra", [("--target", 10**8, "--dtype", "float16"), ("--target", 10**15, "--dtype", "float16")])
def test_d8_overflowing_prediction_is_refused(extrapolate, extra):  # (float32 cannot overflow below MAX_STEP)
    err = extrapolate(*extra, expect=2)
    assert "Inf or NaN" in err and "tensor '" in err and "/out/step-" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_d8_all_finite_sees_every_nan_and_inf(dtype):
    values = torch.randn(10_000).to(dtype)
    assert all_finite(values) and all_finite(values[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 4321, 9999):
            spoiled = values.clone()
            spoiled[where] = bad
            assert not all_finite(spoiled.view(100, 100))


# 9. stale temporaries of dead processes are swept; live ones are left alone ---------------------------
def test_d9_sweep_removes_dead_temporaries_and_restores_a_replaced_output(extrapolate, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (out / f".step-30.relex-tmp-{dead}").mkdir(parents=True)
    (out / f".step-7.relex-old-{dead}").mkdir()
    (out / f".step-7.relex-old-{dead}" / "relex.json").write_text("{}")
    (out / ".step-9.relex-tmp-1").mkdir()  # PID 1 is alive: not ours to remove
    extrapolate("--target", 30)
    assert sorted(p.name for p in out.iterdir()) == [".step-9.relex-tmp-1", "step-30", "step-7"]


# 10. OS errors: one line, exit 2, nothing partial -------------------------------------------------------
def test_d10_out_is_a_file(extrapolate, tmp_path):
    (tmp_path / "o").write_text("x")
    assert "is a file, not a folder" in extrapolate("--target", 30, out=tmp_path / "o" / "sub", expect=2)


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "nonsense"])
def test_d10_bad_device(extrapolate, device):
    assert f"--device {device}" in extrapolate("--target", 30, "--device", device, expect=2)


def test_d10_disk_full_while_writing(pico, tmp_path):
    base, run, _ = pico
    done = subprocess_relex("extrapolate", "-q", "--no-cache", "--base", base, "--run", run, "--target", 30,
                            "--out", tmp_path / "out", limits={resource.RLIMIT_FSIZE: 20_000})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "step-30/model.safetensors: cannot write tensor '" in lines[0] and "too large" in lines[0]
    assert not (tmp_path / "out").exists() and not hidden(tmp_path)


def test_d10_no_space_left_on_device(extrapolate, tmp_path):
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        err = extrapolate("--target", 30, out=out, expect=2)
        assert f"{out}/step-30/model.safetensors: cannot write tensor '" in err and "No space left" in err
        assert not list(out.iterdir())
    finally:
        subprocess.run(["umount", str(out)])


def test_d10_read_only_output(extrapolate, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder immutable here (root ignores mode bits)")
    try:
        err = extrapolate("--target", 30, out=out, expect=2)
        assert str(out) in err and "Operation not permitted" in err
    finally:
        subprocess.run(["chattr", "-i", str(out)])


def test_d10_checkpoint_removed_during_the_run(pico, tmp_path):
    base, run, _ = pico
    model = Relex(cutoff=21).fit(Trajectory.discover(base, run))
    (run / "checkpoint-13" / "model.safetensors").unlink()  # TRL's save_total_limit rotation
    with pytest.raises(RelexError, match=r"checkpoint-13/model.safetensors: cannot read tensor '.+' \(No such file"):
        materialize.extrapolate(model, tmp_path / "out", [30], cache=False, progress=False)
    assert not (tmp_path / "out").exists() and not hidden(tmp_path)


@pytest.mark.parametrize("payload", [{"step": 3}, [1, 2]])
def test_d10_pickle_holding_a_non_tensor(extrapolate, pico, payload):
    _, run, ckpts = pico
    folder = run / "checkpoint-5"
    state = dict(ckpts[5], **payload) if isinstance(payload, dict) else payload
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    err = extrapolate("--target", 30, "--allow-pickle", expect=2)
    assert "checkpoint-5/pytorch_model.bin" in err and ("not a tensor" in err or "not a state dict" in err)


# 11. zero-size tensors ---------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Torch on one thread: the direct methods' many tiny ops only pay for thread hand-offs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", [("alpharl",), ("next", "--next-epochs", 3), ("relex",)])
def test_d11_zero_size_tensor(extrapolate, pico, tmp_path, method, one_thread):
    base, run, _ = pico
    for folder in [base, *run.iterdir()]:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["model.empty"] = torch.zeros(0, 16)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    extrapolate("--target", 30, "--method", *method)
    assert CheckpointReader(tmp_path / "out" / "step-30").specs["model.empty"].shape == (0, 16)


# 12. all targets checked before any is published -------------------------------------------------------
def test_d12_target_appearing_during_the_run_publishes_nothing(extrapolate, tmp_path, monkeypatch):
    out = tmp_path / "out"
    finish = ModelFolderWriter.finish

    def racing(self, meta):  # another process creates step-200 while this one computes
        (out / "step-200").mkdir(exist_ok=True)
        finish(self, meta)

    monkeypatch.setattr(ModelFolderWriter, "finish", racing)
    err = extrapolate("--target", 100, "--target", 200, expect=2, theirs={out / "step-200"})
    assert "step-200: output exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["step-200"]


def test_d12_overwrite_onto_a_file(extrapolate, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "step-30").write_text("in the way")
    extrapolate("--target", 30, "--overwrite")
    assert (out / "step-30" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["step-30"]


def test_d12_failed_rename_puts_back_what_was_published(tmp_path):
    planned = [PlannedTensor("w", (2,), torch.float32)]
    (tmp_path / "base").mkdir()
    old = tmp_path / "out" / "step-2"
    old.mkdir(parents=True)
    (old / "relex.json").write_text("previous output")
    writers = [ModelFolderWriter(tmp_path / "out" / f"step-{t}", tmp_path / "base", {}, planned, 1 << 20)
               for t in (1, 2)]
    for writer in writers:
        writer.weights.write("w", torch.zeros(2))
    writers[1].finish = lambda meta: writers[1].weights.close()
    writers[1].tmp.rename(tmp_path / "elsewhere")  # the second rename will fail
    with pytest.raises(RelexError, match="step-2: cannot write"):
        publish_all(writers, [{}, {}], overwrite=True)
    for writer in writers:
        writer.abort()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step-2"]
    assert (old / "relex.json").read_text() == "previous output"


# 13. float64 -> bf16 / fp16 rounds once ----------------------------------------------------------------
@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_d13_round_once_is_correct_rounding(dtype, bits):
    just_above_tie = torch.tensor([1 + 2.0**-bits + 2.0**-40, -(1 + 2.0**-bits + 2.0**-40)], dtype=torch.float64)
    assert just_above_tie.to(dtype).abs().tolist() == [1.0, 1.0]  # torch's cast rounds twice
    assert round_once(just_above_tie, dtype).abs().tolist() == [1 + 2.0 ** (1 - bits)] * 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen, dtype=torch.float64) * 4
    x[:1000] = just_above_tie[0] + torch.arange(1000, dtype=torch.float64) * 2.0**-30
    got = round_once(x, dtype)
    step = got.view(torch.int16)
    up, down = (step + 1).view(dtype).double(), (step - 1).view(dtype).double()
    err = (x - got.double()).abs()
    even = (step % 2 == 0)
    assert bool(((err < (x - up).abs()) | ((err == (x - up).abs()) & even)).all())
    assert bool(((err < (x - down).abs()) | ((err == (x - down).abs()) & even)).all())


def test_d13_bf16_fast_path_equals_round_to_odd_everywhere():
    gen = torch.Generator().manual_seed(1)
    exponents = torch.randint(-140, 128, (300_000,), generator=gen).double()
    x = torch.randn(300_000, generator=gen, dtype=torch.float64) * 2.0 ** exponents  # subnormal to near the max
    ties = torch.randn(100_000, generator=gen).to(torch.bfloat16).float()
    ties = (ties.view(torch.int32) | 0x8000).view(torch.float32).double()  # float32 values that are bf16 ties
    nudge = torch.randint(-1, 2, (100_000,), generator=gen).double() * ties.abs() * 2.0 ** -40
    values = torch.cat([x, ties + nudge, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38])])
    single = values.to(torch.float32)
    assert torch.equal(round_once(values, torch.bfloat16), _odd(values, single).to(torch.bfloat16))
    assert round_once(torch.tensor([float("nan")], dtype=torch.float64), torch.bfloat16).isnan().all()


def test_d13_engine_rounds_once(extrapolate, pico, tmp_path):
    base, run, _ = pico
    k = torch.arange(1, 1 << 20, dtype=torch.float64)
    w1 = (1 + k * 2.0**-23).float()  # float32 checkpoint values near 1, the base is 1
    pred = 1 + (1.0 + 0.3) * (w1.double() - 1)  # ExPO's float64 prediction, as the engine computes it
    ties = torch.nonzero(pred.to(torch.bfloat16) != round_once(pred, torch.bfloat16)).flatten()
    assert len(ties) >= 4
    for folder in [base, *run.iterdir()]:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["model.ties"] = torch.ones(len(ties)) if folder == base else w1[ties]
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    extrapolate("--target", 30, "--method", "expo", "--dtype", "bfloat16")
    got = CheckpointReader(tmp_path / "out" / "step-30").read("model.ties")
    assert torch.equal(got, round_once(pred[ties], torch.bfloat16))
    assert not torch.equal(got, pred[ties].to(torch.bfloat16))


# minor items ------------------------------------------------------------------------------------------
def test_minor_custom_code_copied_and_base_path_absolute(extrapolate, pico, tmp_path, monkeypatch):
    base, _, _ = pico
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_pico.PicoConfig",
                          "AutoModelForCausalLM": "someone/repo--modeling_pico.PicoForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    for module in ("configuration_pico.py", "modeling_pico.py", "unrelated.py"):
        (base / module).write_text("# custom code\n")
    extrapolate("--target", 30)
    folder = tmp_path / "out" / "step-30"
    assert sorted(p.name for p in folder.glob("*.py")) == ["configuration_pico.py", "modeling_pico.py"]
    meta = strict_json((folder / "relex.json").read_text())
    assert meta["base"] == str(base.resolve()) and Path(meta["run"]).is_absolute()


def test_minor_ignored_flags_warn(extrapolate, caplog):
    with caplog.at_level(logging.WARNING):
        extrapolate("--target", 30, "--method", "expo", "--rank", 3, "--anchor", 5)
    assert "--rank 3 is ignored by --method expo" in caplog.text
    assert "--anchor 5 is ignored by --method expo" in caplog.text


def test_minor_checkpoint_zero_hints_at_base(extrapolate, pico):
    _, run, _ = pico
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-0")
    assert "give that model as --base" in extrapolate("--target", 30, expect=2)


def test_minor_strict_json_from_analyze_backtest_and_report(pico, tmp_path, capsys):
    base, run, ckpts = pico
    for step in STEPS:  # one tensor that never moves: its R^2 and diagnostics are NaN
        edit = load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))
        edit[NAME] = load_file(str(base / "model.safetensors"))[NAME]
        save_file(edit, str(run / f"checkpoint-{step}" / "model.safetensors"), metadata={"format": "pt"})
    common = ["--no-cache", "-q", "--base", str(base), "--run", str(run)]
    assert main(["analyze", *common, "--json", str(tmp_path / "a.json")]) == 0
    assert main(["backtest", *common, "--json", str(tmp_path / "b.json")]) == 0
    assert main(["report", *common, "--cutoff", "13", "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    for path in (tmp_path / "a.json", tmp_path / "b.json", tmp_path / "rep" / "report.json"):
        strict_json(path.read_text())
    assert not hidden(tmp_path)


def test_minor_report_onto_a_file_is_one_line(pico, tmp_path, capsys):
    base, run, _ = pico
    (tmp_path / "rep").write_text("x")
    code = main(["report", "--no-cache", "-q", "--base", str(base), "--run", str(run), "--out",
                 str(tmp_path / "rep" / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("relex: error: ") and "\n" not in err
