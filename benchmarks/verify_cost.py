"""What ``--verify`` costs per candidate: seconds to load a candidate's weights and score N problems, per backend.

On a lab run (its ``base``, ``run`` and ``verify.jsonl``, as ``relex lab`` and verify_calibration.py make them),
RELEX is fitted from the cutoff; the incumbent (the cutoff checkpoint) and each target x shrink are loaded into
one model and scored greedily on the first N problems of ``verify.jsonl``, as ``--verify`` does: in transformers
(``hf``) and in one vLLM engine whose weights are reloaded in place (``vllm``: a CUDA GPU, or vLLM's CPU build).
Each backend runs in a process of its own (vLLM pins its process's torch threads). Prints a table, writes JSON,
and says how often the backends grade a (candidate, problem) alike.

    python benchmarks/verify_cost.py LAB --backends hf vllm --problems 100 --max-new-tokens 48 \\
        --json benchmarks/results/verify_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def measure(lab: Path, backend: str, cutoff: int, targets: list[int], shrinks: list[float], problems: int,
            max_new_tokens: int, grader: str | None, threads: int) -> dict:
    """One backend in this process: the scorer's start-up, then per candidate its load and its scoring."""
    import torch

    from relex.eval.dataset import read_dataset
    from relex.materialize import compute_stats
    from relex.methods import Relex
    from relex.trajectory import Trajectory
    from relex.verify import Candidate, ModelScorer, VllmScorer

    torch.set_num_threads(threads)
    trajectory = Trajectory.discover(lab / "base", lab / "run").observed(cutoff)
    method = Relex().fit(trajectory, progress=False)
    stats = compute_stats(trajectory, cache=False, progress=False)
    items = read_dataset(lab / "verify.jsonl")[:problems]
    start = time.perf_counter()
    scorer = (VllmScorer if backend == "vllm" else ModelScorer)(trajectory, method, stats, items,
                                                                max_new_tokens=max_new_tokens, grader=grader)
    opened = time.perf_counter() - start
    idx = np.arange(len(items))
    rows = []
    for c in [None] + [Candidate(t, s) for t in targets for s in shrinks]:
        t0 = time.perf_counter()
        scorer.load(scorer.weights(c))
        scorer.loaded = c
        t1 = time.perf_counter()
        grades = scorer(c, idx)
        t2 = time.perf_counter()
        rows.append({"candidate": "stop" if c is None else c.label, "load_s": t1 - t0, "score_s": t2 - t1,
                     "accuracy": float(grades.mean()), "grades": grades.astype(int).tolist()})
    dtype = scorer.engine.dtype if backend == "vllm" else scorer.model.dtype
    return {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "open_s": opened, "problems": len(items),
            "candidates": rows,
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def agreement(a: dict, b: dict) -> float:
    """The share of (candidate, problem) pairs that the two backends grade alike."""
    same = [x == y for ra, rb in zip(a["candidates"], b["candidates"], strict=True)
            for x, y in zip(ra["grades"], rb["grades"], strict=True)]
    return float(np.mean(same))


def main() -> None:
    """Each backend in a process of its own (``--one``), then the table, the agreement and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab", type=Path, help="a lab run's folder: base/, run/ and verify.jsonl")
    parser.add_argument("--backends", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"])
    parser.add_argument("--cutoff", type=int, default=4, help="the last observed step (default 4)")
    parser.add_argument("--targets", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--shrinks", type=float, nargs="+", default=[1.0])
    parser.add_argument("--problems", type=int, default=100, help="the first N problems of verify.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--grader", help="module:function (default: math-verify)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the hf backend")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", choices=("hf", "vllm"), help=argparse.SUPPRESS)  # the per-backend process
    args = parser.parse_args()
    settings = (args.lab, args.cutoff, args.targets, args.shrinks, args.problems, args.max_new_tokens, args.grader,
                args.threads)
    if args.one:
        print(json.dumps(measure(settings[0], args.one, *settings[1:])))
        return

    results = []
    for backend in args.backends:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", backend]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{backend}: exit {done.returncode}\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\n{args.lab.name}: {args.problems} problems, {args.max_new_tokens} new tokens at most, greedy")
    print("| backend | dtype | start-up | candidate | load | score | per answer | accuracy |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        for i, c in enumerate(r["candidates"]):
            print(f"| {r['backend']} | {r['dtype']} | {r['open_s'] if i == 0 else 0:.1f} s | {c['candidate']} | "
                  f"{c['load_s']:.2f} s | {c['score_s']:.1f} s | {c['score_s'] / r['problems']:.3f} s | "
                  f"{100 * c['accuracy']:.1f}% |")
    same = agreement(*results) if len(results) == 2 else None
    if same is not None:
        print(f"\nthe backends grade {100 * same:.1f}% of (candidate, problem) pairs alike")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": sys.argv, "results": results, "agreement": same, "commit": commit,
                                         "machine": platform.processor() or platform.machine(),
                                         "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
