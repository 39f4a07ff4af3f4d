"""RELEX through the real engine on real files, checked against a float64 numpy full-SVD reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import STEPS, drift_run, max_relative_error, numpy_relex, predicted_deltas, save_pico_model
from relex import ExPO, Reconstruct, Relex, Trajectory, TwoPoint, compute_stats, extrapolate
from relex.materialize import stream
from relex.trajectory import CheckpointReader


@pytest.mark.parametrize("layout", ["trl", "verl", "openrlhf", "plain"])
def test_relex_matches_numpy_reference_in_every_layout(tmp_path, layout):
    base = save_pico_model(tmp_path / "base")
    ckpts = drift_run(base, tmp_path / "run", layout=layout)
    traj = Trajectory.discover(base, tmp_path / "run")
    assert traj.steps == STEPS
    [folder] = extrapolate(Relex(rank=1, cutoff=13).fit(traj), tmp_path / "out", [40], cache=False, progress=False)
    ref = numpy_relex(load_file(str(base / "model.safetensors")), ckpts, [2, 3, 5, 8, 13], 40)
    assert max_relative_error(predicted_deltas(folder, base), ref) <= 1e-6


def test_rank2_and_bf16_input_match_reference(tmp_path):
    base = save_pico_model(tmp_path / "base", dtype=torch.bfloat16)
    ckpts = drift_run(base, tmp_path / "run", noise=0.05)
    traj = Trajectory.discover(base, tmp_path / "run")
    [folder] = extrapolate(Relex(rank=2).fit(traj), tmp_path / "out", [100], dtype="float32", cache=False,
                           progress=False)
    ref = numpy_relex(load_file(str(base / "model.safetensors")), ckpts, STEPS, 100, rank=2)
    assert max_relative_error(predicted_deltas(folder, base), ref) <= 1e-6
    [kept] = extrapolate(Relex().fit(traj), tmp_path / "kept", [100], cache=False, progress=False)
    assert CheckpointReader(kept).read("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((kept / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_over_worker_threads_match_reference_whatever_the_thread_count(tmp_path, monkeypatch, dtype):
    base = save_pico_model(tmp_path / "base", dtype=dtype)
    ckpts = drift_run(base, tmp_path / "run", noise=0.05)
    traj = Trajectory.discover(base, tmp_path / "run")
    monkeypatch.setattr(stream, "CHUNK_BYTES", 8 * (len(STEPS) + 1) * 100)  # 100 columns: many chunks a tensor
    threads, outputs, grams = torch.get_num_threads(), [], []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            grams.append(compute_stats(traj, cache=False, progress=False))
            [folder] = extrapolate(Relex(rank=2).fit(traj), tmp_path / f"out{count}", [100], dtype="float32",
                                   cache=False, progress=False)
            outputs.append(load_file(str(folder / "model.safetensors")))
    finally:
        torch.set_num_threads(threads)
    ref = numpy_relex(load_file(str(base / "model.safetensors")), ckpts, STEPS, 100, rank=2)
    assert max_relative_error(predicted_deltas(folder, base), ref) <= 1e-6
    assert all(np.array_equal(grams[0][k].gram, grams[1][k].gram) for k in grams[0])
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def test_output_folder_loads_in_transformers(pico, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, run, _ = pico
    [folder] = extrapolate(Relex(cutoff=8).fit(Trajectory.discover(base, run)), tmp_path / "out", [30], progress=False,
                           cache=False)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "relex.json"} <= names
    assert (folder / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(folder)("12+3=", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    meta = json.loads((folder / "relex.json").read_text())
    assert meta["method"] == "relex" and meta["target"] == 30 and meta["observed_steps"] == [2, 3, 5, 8]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_sharded_output_equals_unsharded_and_loads(pico, tmp_path):
    from transformers import AutoModelForCausalLM

    base, run, _ = pico
    model = Relex(cutoff=13).fit(Trajectory.discover(base, run))
    [one] = extrapolate(model, tmp_path / "one", [50], progress=False, cache=False)
    [many] = extrapolate(model, tmp_path / "many", [50], max_shard_size="4KB", progress=False, cache=False)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert all(name.startswith("model-") and name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    a, b = CheckpointReader(one), CheckpointReader(many)
    assert a.specs == b.specs
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.specs)
    AutoModelForCausalLM.from_pretrained(many)


def test_streaming_with_tiny_budget_equals_in_memory(pico, tmp_path, caplog):
    base, run, _ = pico
    traj = Trajectory.discover(base, run)
    model = Relex(rank=2, cutoff=13).fit(traj)
    big, _ = extrapolate(model, tmp_path / "big", [40, 80], progress=False, cache=False)
    assert "rows at a time" not in caplog.text
    [small] = extrapolate(model, tmp_path / "small", [40], memory_budget="1KB", progress=False, cache=False)
    assert "--memory-budget of 1000 bytes" in caplog.text and "at least 256MB" in caplog.text
    a, b = CheckpointReader(big), CheckpointReader(small)
    for name in a.specs:
        torch.testing.assert_close(a.read(name), b.read(name), rtol=1e-6, atol=1e-7)


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_pico_model(tmp_path / "base", tie=True)
    assert "lm_head.weight" not in load_file(str(base / "model.safetensors"))
    drift_run(base, tmp_path / "run")
    # one checkpoint saved the tied head separately, as some trainers do: it is the embedding, dropped
    extra = tmp_path / "run" / "checkpoint-21" / "model.safetensors"
    tensors = load_file(str(extra))
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, str(extra))
    [folder] = extrapolate(Relex().fit(Trajectory.discover(base, tmp_path / "run")), tmp_path / "out", [30],
                           progress=False, cache=False)
    assert "lm_head.weight" not in CheckpointReader(folder).specs
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_exactly_linear_trajectory_is_hit_by_linear_methods(tmp_path):
    """A line through the base: RELEX, two-point (from the base or a later anchor) and ExPO aimed at the
    target all land on it."""
    base = save_pico_model(tmp_path / "base")
    drift_run(base, tmp_path / "run", noise=0.0, offset=0.0)
    truth = drift_run(base, tmp_path / "future", steps=[100], noise=0.0, offset=0.0)[100]
    traj = Trajectory.discover(base, tmp_path / "run")
    w0 = load_file(str(base / "model.safetensors"))
    for method in (Relex(cutoff=8), TwoPoint(cutoff=8), TwoPoint(cutoff=8, anchor=3),
                   ExPO(alpha=(100 - 8) / 8, cutoff=8)):
        out = tmp_path / f"{method.name}-{method.params().get('anchor', 0)}"
        [folder] = extrapolate(method.fit(traj), out, [100], progress=False, cache=False)
        pred = predicted_deltas(folder, base)
        ref = {n: (truth[n].double() - w0[n].double()).numpy() for n in w0}
        assert max_relative_error(pred, ref) <= 1e-5, method.name


def test_frozen_tensor_keeps_base_bytes(pico, tmp_path):
    base, run, _ = pico
    w0 = load_file(str(base / "model.safetensors"))
    frozen = "model.norm.weight"
    for folder in run.iterdir():
        tensors = load_file(str(folder / "model.safetensors"))
        save_file({**tensors, frozen: w0[frozen]}, str(folder / "model.safetensors"))
    [out] = extrapolate(Relex().fit(Trajectory.discover(base, run)), tmp_path / "out", [99], progress=False,
                        cache=False)
    assert torch.equal(CheckpointReader(out).read(frozen), w0[frozen])


def test_reconstruct_writes_observed_steps(pico, tmp_path):
    base, run, ckpts = pico
    folders = extrapolate(Reconstruct(rank=6).fit(Trajectory.discover(base, run)), tmp_path / "rec", STEPS,
                          progress=False, cache=False)
    for step, folder in zip(STEPS, folders):
        reader = CheckpointReader(folder)
        for name, tensor in ckpts[step].items():
            torch.testing.assert_close(reader.read(name), tensor, rtol=1e-5, atol=1e-6)


def test_cache_serves_shorter_cutoffs_without_reading(pico, tmp_path, monkeypatch):
    base, run, _ = pico
    traj = Trajectory.discover(base, run)
    full = compute_stats(traj, cache=tmp_path / "cache", progress=False)
    fresh = compute_stats(traj.observed(8), cache=False, progress=False)

    def no_reads(*args, **kwargs):
        raise AssertionError("checkpoint read despite cached statistics")

    monkeypatch.setattr(CheckpointReader, "read", no_reads)
    cached = compute_stats(traj.observed(8), cache=tmp_path / "cache", progress=False)
    assert cached.keys() == full.keys()
    for name in fresh:
        np.testing.assert_allclose(cached[name].gram, fresh[name].gram, rtol=1e-12)
        np.testing.assert_array_equal(cached[name].steps, [2, 3, 5, 8])


def test_stale_cache_is_not_used(pico, tmp_path):
    base, run, _ = pico
    traj = Trajectory.discover(base, run)
    compute_stats(traj, cache=tmp_path / "cache", progress=False)
    drift_run(base, tmp_path / "run2", seed=7)
    target = run / "checkpoint-5" / "model.safetensors"
    target.write_bytes((tmp_path / "run2" / "checkpoint-5" / "model.safetensors").read_bytes())
    again = compute_stats(Trajectory.discover(base, run), cache=tmp_path / "cache", progress=False)
    fresh = compute_stats(Trajectory.discover(base, run), cache=False, progress=False)
    for name in fresh:
        np.testing.assert_allclose(again[name].gram, fresh[name].gram, rtol=1e-12)


def test_checkpoints_given_in_any_order_give_the_same_result(pico, tmp_path):
    base, run, _ = pico
    pairs = [f"{s}={run / f'checkpoint-{s}'}" for s in STEPS]
    a = Relex(cutoff=13).fit(Trajectory.discover(base, checkpoints=pairs))
    b = Relex(cutoff=13).fit(Trajectory.discover(base, checkpoints=pairs[::-1]))
    [fa] = extrapolate(a, tmp_path / "a", [60], progress=False, cache=False)
    [fb] = extrapolate(b, tmp_path / "b", [60], progress=False, cache=False)
    ra, rb = CheckpointReader(fa), CheckpointReader(fb)
    assert all(torch.equal(ra.read(n), rb.read(n)) for n in ra.specs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU path is checked where one is")
def test_cuda_matches_the_float64_reference_and_the_cpu(tmp_path):
    """--device cuda: the same float64 arithmetic on the GPU, whole blocks and row blocks alike."""
    base = save_pico_model(tmp_path / "base")
    ckpts = drift_run(base, tmp_path / "run", noise=0.05)
    traj = Trajectory.discover(base, tmp_path / "run")
    ref = numpy_relex(load_file(str(base / "model.safetensors")), ckpts, STEPS, 60, rank=2)
    folders = {}
    for device, budget in [("cpu", "2GB"), ("cuda", "2GB"), ("cuda", "1KB")]:
        [folders[device, budget]] = extrapolate(Relex(rank=2).fit(traj), tmp_path / f"{device}-{budget}", [60],
                                                device=device, memory_budget=budget, cache=False, progress=False)
        assert max_relative_error(predicted_deltas(folders[device, budget], base), ref) <= 1e-6
    cpu, gpu = (predicted_deltas(folders[k], base) for k in [("cpu", "2GB"), ("cuda", "2GB")])
    assert max_relative_error(gpu, cpu) <= 1e-6
