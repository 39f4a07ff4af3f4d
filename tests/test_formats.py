"""Checkpoints as trainers write them by default, read in place: verl's FSDP shards and DCP folders, written here by
the torch APIs the trainers call (FSDP2 ``fully_shard`` on gloo, world sizes 1 and 2; ``dcp.save``), read bit for bit;
hostile pickles refused without running; quantized deltas said once.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import drift_run, save_pico_model, state_dict_module
from relex.cli import main
from relex.errors import RelexError
from relex.trajectory.dcp import DcpReader
from relex.trajectory.fsdp import FsdpShardReader

STEPS = [2, 3, 5, 8]


def _save_step(tensors: dict[str, torch.Tensor], actor: Path, dcp_dir: Path) -> None:
    """What verl (per-rank torch.save of the sharded state dict) and NeMo-RL (dcp.save of {"model": ...}) write."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    model = state_dict_module(tensors)
    fully_shard(model)
    state = model.state_dict()
    actor.mkdir(parents=True, exist_ok=True)
    torch.save(state, actor / f"model_world_size_{dist.get_world_size()}_rank_{dist.get_rank()}.pt")
    dcp.save({"model": state}, checkpoint_id=str(dcp_dir))


def _write_run(rank: int, world: int, steps: dict[int, dict], root: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/store-{world}", rank=rank, world_size=world)
    try:
        for step, tensors in steps.items():
            _save_step(tensors, root / f"verl{world}" / f"global_step_{step}" / "actor",
                       root / f"nemo{world}" / f"step_{step}" / "policy" / "weights")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A bf16 pico base, fp32 checkpoints as HF folders, and the same checkpoints as verl FSDP shards and NeMo-RL DCP
    folders written by world sizes 1 (in this process) and 2 (two spawned gloo ranks)."""
    root = tmp_path_factory.mktemp("formats")
    base = save_pico_model(root / "base", dtype=torch.bfloat16)
    steps = drift_run(base, root / "hf", steps=STEPS, dtype=torch.float32)
    _write_run(0, 1, steps, root)
    mp.spawn(_write_run, args=(2, steps, root), nprocs=2)
    return {"root": root, "base": base, "steps": steps}


@pytest.mark.parametrize("world", [1, 2])
def test_fsdp_shards_and_dcp_read_bit_for_bit(runs, world):
    for step, tensors in runs["steps"].items():
        actor = runs["root"] / f"verl{world}" / f"global_step_{step}" / "actor"
        dcp_dir = runs["root"] / f"nemo{world}" / f"step_{step}" / "policy" / "weights"
        for reader in (FsdpShardReader(actor), DcpReader(dcp_dir, names=frozenset(tensors))):
            assert reader.specs.keys() == tensors.keys()
            for name, value in tensors.items():
                assert reader.specs[name].dtype == torch.float32  # fp32 masters stay fp32
                assert torch.equal(reader.read(name), value), name
                assert torch.equal(reader.read(name, 1, 3), value[1:3]), name


def _extrapolate(base: Path, run: Path, out: Path) -> dict[str, torch.Tensor]:
    assert main(["extrapolate", "--quiet", "--no-cache", "--base", str(base), "--run", str(run), "--target", "12",
                 "--out", str(out)]) == 0
    return load_file(str(out / "step-12" / "model.safetensors"))


def test_extrapolate_from_shards_equals_hf_run(runs, tmp_path):
    import json

    hf = _extrapolate(runs["base"], runs["root"] / "hf", tmp_path / "hf")
    for run in ("verl2", "nemo2"):
        got = _extrapolate(runs["base"], runs["root"] / run, tmp_path / run)
        assert got.keys() == hf.keys() and all(torch.equal(got[n], hf[n]) for n in hf), run
    record = json.loads((tmp_path / "verl2" / "step-12" / "relex.json").read_text())
    assert record["stored_dtypes"]["base"] == {"bfloat16": len(hf)}
    assert record["stored_dtypes"]["8"] == {"float32": len(hf)}
    assert record["quantized_deltas"]["quantized"] == 0


def test_verl_step_reads_hf_weights_first_and_incomplete_shards_name_the_merger(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["root"] / "verl2", run)
    (run / "global_step_8" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    code = main(["extrapolate", "--quiet", "--base", str(runs["base"]), "--run", str(run), "--target", "12",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "model_world_size_2_rank_1.pt: missing" in err and "verl.model_merger merge" in err
    assert len(err.strip().splitlines()) == 1


class _Planted:
    """A pickle that, if unpickled by an unrestricted loader, runs a shell command creating a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_metadata_and_shard_are_refused_without_running(runs, tmp_path, capsys):
    marker = tmp_path / "ran"
    dcp_dir = tmp_path / "run" / "step_2" / "policy" / "weights"
    shutil.copytree(runs["root"] / "nemo1" / "step_2" / "policy" / "weights", dcp_dir)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(RelexError, match=r"\.metadata: refused: global (posix|os)\.system is not one of DCP's"):
        DcpReader(dcp_dir)
    actor = tmp_path / "verl" / "global_step_2" / "actor"
    actor.mkdir(parents=True)
    torch.save({"model.norm.weight": _Planted(marker)}, actor / "model_world_size_1_rank_0.pt")
    with pytest.raises(RelexError, match=r"rank_0\.pt: blocked: .*verl\.model_merger merge --backend fsdp"):
        FsdpShardReader(actor)
    code = main(["extrapolate", "--quiet", "--base", str(runs["base"]), "--checkpoint", f"2={dcp_dir}",
                 "--checkpoint", f"3={actor}", "--target", "9", "--out", str(tmp_path / "o")])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()


def test_hf_safetensors_dcp_layout_is_a_plain_model_folder(runs, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from relex.trajectory import CheckpointReader

    tensors = runs["steps"][2]
    dcp.save(dict(tensors), storage_writer=HuggingFaceStorageWriter(str(tmp_path / "hf")), no_dist=True)
    reader = CheckpointReader(tmp_path / "hf")
    assert all(torch.equal(reader.read(n), v) for n, v in tensors.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_deltas_warned_once_for_a_pure_bf16_run_only(tmp_path, caplog, dtype):
    base = save_pico_model(tmp_path / "base", dtype=dtype)
    drift_run(base, tmp_path / "run", steps=[2, 3, 5, 8], dtype=dtype, slope=1e-5, offset=0.0, noise=1e-5)
    args = ["--quiet", "--no-cache", "--base", str(base), "--run", str(tmp_path / "run")]
    with caplog.at_level(logging.WARNING):
        assert main(["extrapolate", *args, "--target", "12", "--out", str(tmp_path / "o"), "--auto", "--force"]) == 0
        said = caplog.text.count("the deltas look quantized")
        caplog.clear()
        assert main(["analyze", *args]) == 0
    if dtype == torch.bfloat16:
        assert said == 1 and "16-bit weights" in caplog.text and "16-bit export of fp32 masters" in caplog.text
    else:
        assert said == 0 and "quantized" not in caplog.text
