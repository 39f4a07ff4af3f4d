"""--delta-dtype float16: the RELEX reference code's fp16 subtraction, cross-checked against an independent
implementation rebuilt here from its published description; kept apart from exact deltas in the cache."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import drift_run, save_pico_model
import relex
from relex import Relex, Trajectory, compute_stats, extrapolate
from relex.cli import main
from relex.trajectory import CheckpointReader

STEPS = [1, 2, 3, 4, 5, 6]  # evenly spaced from 1: OLS on rows 0..N-1 at row T-1 is OLS on steps at step T
TARGET = 12


def replicated_relex(w0: dict[str, torch.Tensor], checkpoints: list[dict[str, torch.Tensor]],
                     target_row: int) -> dict[str, torch.Tensor]:
    """The independent replication as published: per tensor, fp16 deltas (both weights cast to fp16, subtracted
    in fp16), the uncentred rank-1 factor of their temporal Gram, its coefficients fit by OLS on rows 0..N-1
    and evaluated at ``target_row``; the output is bf16(fp32(W0) + delta)."""
    out = {}
    rows = np.arange(len(checkpoints), dtype=np.float64)
    for name, base in w0.items():
        deltas = torch.stack([(ckpt[name].half() - base.half()).float().reshape(-1) for ckpt in checkpoints])
        values, vectors = torch.linalg.eigh(deltas @ deltas.T)
        sigma, u = values[-1].sqrt(), vectors[:, -1]
        direction = deltas.T @ u / sigma
        slope, intercept = np.polyfit(rows, (sigma * u).double().numpy(), 1)
        delta = float(slope * target_row + intercept) * direction
        out[name] = (base.float() + delta.reshape(base.shape)).to(torch.bfloat16)
    return out


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between ``a`` and ``b``, elementwise (their bit patterns on one ordered line)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def run_of(tmp_path, checkpoint_dtype: torch.dtype) -> tuple[Trajectory, dict, list[dict]]:
    """A bf16 pico base with checkpoints at steps 1..6 saved at ``checkpoint_dtype`` (fp32: verl's masters)."""
    base = save_pico_model(tmp_path / "base", dtype=torch.bfloat16)
    saved = drift_run(base, tmp_path / "run", steps=STEPS, noise=0.02, slope=0.01, offset=0.0,
                      dtype=checkpoint_dtype)
    w0 = load_file(str(base / "model.safetensors"))
    return Trajectory.discover(base, tmp_path / "run"), w0, [saved[s] for s in STEPS]


@pytest.mark.parametrize("checkpoint_dtype", [torch.bfloat16, torch.float32])
def test_float16_deltas_agree_with_the_independent_replication_to_bf16_rounding(tmp_path, checkpoint_dtype):
    trajectory, w0, checkpoints = run_of(tmp_path, checkpoint_dtype)
    assert trajectory.steps == STEPS
    expected = replicated_relex(w0, checkpoints, TARGET - 1)
    written = {}
    for delta_dtype in ("float16", "float64"):
        [folder] = extrapolate(Relex().fit(trajectory), tmp_path / delta_dtype, [TARGET], cache=False,
                               progress=False, delta_dtype=delta_dtype)
        reader = CheckpointReader(folder)
        written[delta_dtype] = {name: reader.read(name) for name in expected}
        assert json.loads((folder / "relex.json").read_text())["delta_dtype"] == delta_dtype
    ulps = {d: torch.cat([bf16_ulps(out[n], expected[n]).reshape(-1) for n in expected]) for d, out in written.items()}
    differing = {d: float((u > 0).double().mean()) for d, u in ulps.items()}
    assert int(ulps["float16"].max()) <= 1 and differing["float16"] < 0.01, differing  # bf16 rounding, no more
    assert differing["float64"] > 10 * max(differing["float16"], 1e-4), differing  # exact deltas: another model


def test_statistics_cache_keeps_exact_and_float16_grams_apart(tmp_path):
    trajectory, _, _ = run_of(tmp_path, torch.float32)
    cache = tmp_path / "cache"
    fresh = {d: compute_stats(trajectory, cache=False, progress=False, delta_dtype=d) for d in ("float64", "float16")}
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.array_equal(fresh["float64"][name].gram, fresh["float16"][name].gram)
    for delta_dtype in ("float64", "float16", "float64", "float16"):  # the second round is served by the cache
        cached = compute_stats(trajectory, cache=cache, progress=False, delta_dtype=delta_dtype)
        assert all(np.array_equal(cached[n].gram, fresh[delta_dtype][n].gram) for n in cached)
    assert len(list(cache.glob("stats-*.safetensors"))) == 2


def test_cli_flag_writes_the_float16_model_and_refuses_what_would_mix_in_exact_deltas(tmp_path, capsys):
    trajectory, _, _ = run_of(tmp_path, torch.bfloat16)
    common = ["--base", str(trajectory.base), "--run", str(tmp_path / "run"), "--no-cache", "-q"]
    assert main(["extrapolate", *common, "--target", str(TARGET), "--out", str(tmp_path / "out"),
                 "--delta-dtype", "float16"]) == 0
    assert json.loads((tmp_path / "out" / f"step-{TARGET}" / "relex.json").read_text())["delta_dtype"] == "float16"
    assert main(["extrapolate", *common, "--target", str(TARGET), "--out", str(tmp_path / "direct"),
                 "--method", "alpharl", "--delta-dtype", "float16"]) == 2
    assert "--method alpharl reads its deltas exactly" in capsys.readouterr().err
    assert main(["analyze", *common, "--probe", str(tmp_path / "prompts.txt"), "--delta-dtype", "float16"]) == 2
    assert "--probe and --verify load candidates from exact deltas" in capsys.readouterr().err
    assert not (tmp_path / "direct").exists()


def test_ray_tasks_make_the_drivers_float16_deltas(tmp_path):
    from relex.materialize.ray_executor import RunContext, _portable, gram_task
    from relex.materialize.stream import DeltaStream

    trajectory, _, _ = run_of(tmp_path, torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    local = DeltaStream(trajectory, 1 << 30, delta_dtype="float16")
    context = RunContext(_portable(trajectory), None, [], local.budget, relex.__version__, "test", local.delta_dtype)
    rows = local.base.specs[name].rows
    assert np.array_equal(gram_task(context, name, 0, rows), local.load(name, 0, rows).gram().numpy())
    assert not np.array_equal(gram_task(replace(context, delta_dtype="float64", key="exact"), name, 0, rows),
                              local.load(name, 0, rows).gram().numpy())



def test_a_block_converted_whole_rounds_as_one_converted_by_chunks(tmp_path, monkeypatch):
    from relex.materialize import stream

    trajectory, _, _ = run_of(tmp_path, torch.float32)  # fp32 masters beside a bf16 base: float64 deltas rounded
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = stream.DeltaStream(trajectory, 1 << 30, delta_dtype="float16")
    rows, ones = deltas.base.specs[name].rows, np.ones((1, len(STEPS)))

    def passes(block: stream.Block) -> tuple[torch.Tensor, torch.Tensor]:
        return block.gram(), block.weighted_sums(ones, [torch.empty(block.numel, dtype=torch.float64)])[0].clone()

    whole = passes(deltas.load(name, 0, rows, stacked=True))  # the GPU's way: converted once for both passes
    monkeypatch.setattr(stream, "CHUNK_BYTES", 8 * (len(STEPS) + 1) * 100)  # 100 columns a chunk
    by_chunks = passes(deltas.load(name, 0, rows))
    assert torch.allclose(whole[0], by_chunks[0], rtol=1e-14, atol=0) and torch.equal(whole[1], by_chunks[1])
