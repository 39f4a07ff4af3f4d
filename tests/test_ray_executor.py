"""``--executor ray`` on a local Ray instance: the local executor's files byte for byte, and its statistics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from relex import Trajectory, compute_stats
from relex.budget import FIXED_OVERHEAD
from relex.cli import main
from relex.materialize.stream import DeltaStream

# 10 kB above the fixed overhead: the pico model's MLP weights and embedding take several row blocks
ROW_BLOCK_BUDGET = str(FIXED_OVERHEAD + 10_000)


def in_row_blocks(base: Path, run: Path, name: str, n_outputs: int, cutoff: int | None = None) -> bool:
    stream = DeltaStream(Trajectory.discover(base, run).observed(cutoff), int(ROW_BLOCK_BUDGET), n_outputs=n_outputs)
    return len(stream.row_ranges(stream.base.specs[name])) > 1


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def extrapolate(base: Path, run: Path, out: Path, *extra) -> None:
    args = ["extrapolate", "--base", base, "--run", run, "--cutoff", 13, "--target", 30, "--target", 60,
            "--out", out, "--dtype", "bfloat16", "--max-shard-size", "4KB", "--memory-budget", ROW_BLOCK_BUDGET,
            "-q", *extra]
    assert main([str(a) for a in args]) == 0


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cached_stats(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """A statistics cache's metadata and tensor bytes (safetensors orders the metadata differently per process)."""
    [path] = folder.glob("stats-*.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}


def test_ray_writes_the_local_bytes_cached_or_not(ray, pico, tmp_path):
    base, run, _ = pico
    assert in_row_blocks(base, run, "model.embed_tokens.weight", n_outputs=2, cutoff=13)
    extrapolate(base, run, tmp_path / "local", "--cache", tmp_path / "local-cache")
    extrapolate(base, run, tmp_path / "ray", "--executor", "ray", "--cache", tmp_path / "ray-cache")
    local = files(tmp_path / "local")
    assert len([name for name in local if name.endswith(".safetensors")]) > 2
    assert files(tmp_path / "ray") == local
    assert cached_stats(tmp_path / "ray-cache") == cached_stats(tmp_path / "local-cache")  # saved by the driver
    extrapolate(base, run, tmp_path / "warm", "--executor", "ray", "--cache", tmp_path / "ray-cache")
    assert files(tmp_path / "warm") == local  # weights from cached statistics, no Gram tasks


def test_ray_statistics_are_the_local_ones(ray, pico):
    base, run, _ = pico
    trajectory = Trajectory.discover(base, run)
    local = compute_stats(trajectory, memory_budget=ROW_BLOCK_BUDGET, cache=False, progress=False)
    remote = compute_stats(trajectory, memory_budget=ROW_BLOCK_BUDGET, cache=False, progress=False, executor="ray")
    assert list(remote) == list(local)
    assert all(remote[n].gram.tobytes() == local[n].gram.tobytes() and remote[n].shape == local[n].shape
               for n in local)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.0.mlp.gate_proj.weight"])
def test_nan_in_a_checkpoint_is_the_local_one_line(ray, pico, tmp_path, capsys, name):
    """Found in a task (a tensor in one block) or by the driver (summed over row blocks): the same line."""
    base, run, _ = pico
    assert in_row_blocks(base, run, name, n_outputs=1) == (name != "model.norm.weight")
    path = run / "checkpoint-5" / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(path))
    errors = []
    for executor in ("local", "ray"):
        code = main(["extrapolate", "--base", str(base), "--run", str(run), "--target", "30", "--out",
                     str(tmp_path / executor), "--memory-budget", ROW_BLOCK_BUDGET, "--executor", executor,
                     "--no-cache", "-q"])
        assert code == 2 and not (tmp_path / executor).exists()
        errors.append(capsys.readouterr().err.strip().splitlines())
    assert errors[0] == errors[1] == [f"relex: error: {path}: tensor '{name}' contains NaN or Inf"]


def test_ray_refuses_whole_checkpoint_methods(ray, pico, tmp_path, capsys):
    base, run, _ = pico
    code = main(["extrapolate", "--base", str(base), "--run", str(run), "--target", "30", "--out",
                 str(tmp_path / "out"), "--method", "alpharl", "--executor", "ray", "--no-cache", "-q"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "relex: error: --method alpharl reads whole checkpoints per tensor: it runs with --executor local only"]
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_one_line_names_the_extra(pico, tmp_path, capsys, monkeypatch):
    base, run, _ = pico
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["extrapolate", "--base", str(base), "--run", str(run), "--target", "30", "--out",
                 str(tmp_path / "out"), "--executor", "ray", "-q"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "relex: error: --executor ray needs Ray, an optional extra: pip install 'relex-rlvr[ray]'"]
