"""A verl FSDP run read in place against merging every checkpoint first: time and disk.

verl saves each step as per-rank shards (``global_step_N/actor/model_world_size_W_rank_R.pt``, fp32 masters)
and, by default, no merged weights. The usual route is ``python -m verl.model_merger merge --backend fsdp``
on every step, then a tool on the merged folders. verl is not installed here, so the merge is a stand-in that
does what the merger does per step: load every rank's shard, join each tensor's rows, cast to bfloat16 (the
merger's output dtype) and write a safetensors folder. The shards are written by the torch APIs verl uses
(FSDP2 ``fully_shard`` on gloo ranks, ``torch.save`` of the sharded state dict).

    python benchmarks/bench_verl_shards.py --model small --steps 8 --world 2 --json benchmarks/results/verl_shards.json

Prints a table and writes JSON. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from bench_extrapolate import MODELS, generate, measure  # noqa: E402
from conftest import state_dict_module  # noqa: E402  (the tests' module of a state dict, sharded the same way)


def write_shards(rank: int, world: int, hf_run: Path, verl_run: Path, steps: list[int], store: Path) -> None:
    """One gloo rank: each step's checkpoint sharded by FSDP2 and saved as verl saves it."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for step in steps:
            model = state_dict_module(load_file(str(hf_run / f"checkpoint-{step}" / "model.safetensors")))
            fully_shard(model)
            actor = verl_run / f"global_step_{step}" / "actor"
            (actor / "huggingface").mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), actor / f"model_world_size_{world}_rank_{rank}.pt")
            if rank == 0:
                shutil.copy(hf_run / f"checkpoint-{step}" / "config.json", actor / "huggingface" / "config.json")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def merge_step(actor: Path, world: int) -> None:
    """The stand-in for ``verl.model_merger merge --backend fsdp``: join the ranks' rows, cast to bf16, save."""
    from torch.distributed.tensor import DTensor

    shards = [torch.load(actor / f"model_world_size_{world}_rank_{r}.pt", weights_only=True, map_location="cpu")
              for r in range(world)]
    merged = {}
    for name in shards[0]:
        parts = [s[name].to_local() if isinstance(s[name], DTensor) else s[name] for s in shards]
        merged[name] = torch.cat(parts, dim=0).to(torch.bfloat16).contiguous()
    save_file(merged, str(actor / "huggingface" / "model.safetensors"), metadata={"format": "pt"})


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in folder.rglob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    steps = list(range(1, args.steps + 1))
    relex = [sys.executable, "-m", "relex", "extrapolate", "-q", "--no-cache"]
    with tempfile.TemporaryDirectory(prefix="relex-verl-bench-") as tmp:
        scratch = Path(tmp)
        params = generate(scratch, args.model, steps, dtype=torch.float32)
        hf_run, verl_run = scratch / "run", scratch / "verl"
        mp.spawn(write_shards, args=(args.world, hf_run, verl_run, steps, scratch / "store"), nprocs=args.world)
        shutil.rmtree(hf_run)
        shard_bytes = folder_bytes(verl_run, "*.pt")
        target = str(2 * steps[-1])
        direct = measure([*relex, "--base", str(scratch / "base"), "--run", str(verl_run), "--target", target,
                          "--out", str(scratch / "out-direct")])
        start = time.perf_counter()
        for step in steps:
            merge_step(verl_run / f"global_step_{step}" / "actor", args.world)
        merge_seconds = time.perf_counter() - start
        merged_bytes = folder_bytes(verl_run, "model.safetensors")
        merged = measure([*relex, "--base", str(scratch / "base"), "--run", str(verl_run), "--target", target,
                          "--out", str(scratch / "out-merged")])
    rows = [("shards read in place (fp32 masters)", direct["seconds"], 0.0, shard_bytes, 0),
            ("merge every step (bf16), then relex", merged["seconds"], merge_seconds, shard_bytes, merged_bytes)]
    print(f"\n{args.model} ({params / 1e6:.0f}M parameters), {len(steps)} steps, world size {args.world}")
    print("| route | relex s | merge s | total s | shards GB | merged copies GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, seconds, merge, shards, copies in rows:
        print(f"| {label} | {seconds:.1f} | {merge:.1f} | {seconds + merge:.1f} | {shards / 1e9:.2f} | {copies / 1e9:.2f} |")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": sys.argv, "commit": commit, "machine": platform.processor(),
                                         "parameters": params, "steps": steps, "world": args.world,
                                         "direct": direct, "merge_seconds": merge_seconds, "merged": merged,
                                         "shard_bytes": shard_bytes, "merged_bytes": merged_bytes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
