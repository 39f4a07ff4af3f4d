"""Benchmark ``relex extrapolate`` on a synthetic bf16 or fp32 run with a real model's tensor shapes.

Generates base + T checkpoints (linear drift plus noise; the drift a dense random matrix per tensor, or
rank 1 with ``--drift rank1``) in a scratch folder, then for each memory budget runs ``cat`` over the same
input files and ``relex extrapolate`` for each ``--method`` (interleaved, on the same inputs) as subprocesses,
reporting wall time, the ratio to ``cat``, and peak memory: RssAnon (the process's own memory, which
the budget bounds) and total RSS (which also counts touched pages of memory-mapped input files).
``--budget whole`` holds the largest tensor's whole stack, ``--budget eighth`` an eighth of it.
``--device cuda`` (repeatable, e.g. ``--device cpu --device cuda``) times each device on the same inputs and,
with two devices, reports how far their outputs' deltas disagree (max |a - b| / max |b - base|, b the first
device's, which should stay below 1e-6). ``--reference`` also times the public RELEX reference pipeline's
algorithm (re-implemented from its description in reference_pipeline.py: a float16 delta store on disk, then a float32 SVD per tensor).
``--independent`` also times an independent public implementation's algorithm (basetenlabs/relex-replication,
re-implemented in independent_relex.py: float16 deltas, float32 Gram over 1M-element blocks, two passes, 16
reader threads). Each of their outputs is compared with relex's (the first device's): the share of elements that
differ, the largest difference in ulps of the stored dtype, and max |a - b| / max |relex - base|.
``--lab-dir LAB`` times a finished run instead (LAB/base and LAB/run, e.g. a ``relex lab`` folder, LoRA ones
included) from ``--cutoff`` to the run's last step.
Prints a table and writes JSON. Not a test: numbers depend on the machine.

    python benchmarks/bench_extrapolate.py --model small
    python benchmarks/bench_extrapolate.py --model qwen2.5-0.5b --dtype float32 --budget whole --budget eighth --reference
    python benchmarks/bench_extrapolate.py --model qwen2.5-0.5b --budget whole --budget eighth --reference --independent
    python benchmarks/bench_extrapolate.py --model qwen2.5-0.5b --budget 2GB --budget 256MB
    python benchmarks/bench_extrapolate.py --model small --method relex --method alpharl --method next --budget 256MB
    python benchmarks/bench_extrapolate.py --model qwen2.5-0.5b --budget whole --budget eighth --device cpu --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from relex.units import parse_size

MODELS = {
    # name: (vocab, hidden, layers, intermediate, heads, kv_heads, tied)
    "small": (32000, 512, 8, 1408, 8, 2, True),
    "qwen2.5-0.5b": (151936, 896, 24, 4864, 14, 2, True),
}


def model_shapes(name: str) -> dict[str, tuple[int, ...]]:
    vocab, hidden, layers, inter, heads, kv, _ = MODELS[name]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
                   p + "self_attn.k_proj.weight": (kv * head_dim, hidden), p + "self_attn.k_proj.bias": (kv * head_dim,),
                   p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.v_proj.bias": (kv * head_dim,),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    return shapes


def generate(folder: Path, model: str, steps: list[int], drift: str = "dense",
             dtype: torch.dtype = torch.bfloat16) -> int:
    """Write base/ and run/checkpoint-N/ in ``dtype``; returns the number of parameters.

    ``drift``: each tensor's direction of motion, a dense Gaussian matrix (a flat singular spectrum: the worst
    case for AlphaRL's and NExt's top singular vectors) or, for 2-D tensors, a rank-1 outer product."""
    vocab, hidden, layers, inter, heads, kv, tied = MODELS[model]
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
              "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
              "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tied,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "dtype": str(dtype).removeprefix("torch.")}
    gen = torch.Generator().manual_seed(0)
    shapes = model_shapes(model)
    base = {n: (0.02 * torch.randn(s, generator=gen)).to(dtype) for n, s in shapes.items()}
    direction = {n: (torch.outer(torch.randn(s[0], generator=gen), torch.randn(s[1], generator=gen))
                     if drift == "rank1" and len(s) == 2 else torch.randn(s, generator=gen)).to(torch.bfloat16)
                 for n, s in shapes.items()}
    pool = {n: torch.randn(t.numel() + len(steps), generator=gen).to(torch.bfloat16) for n, t in base.items()}
    for sub, tensors in [("base", base)] + [(f"run/checkpoint-{s}", None) for s in steps]:
        out = folder / sub
        out.mkdir(parents=True)
        if tensors is None:
            step = int(sub.rsplit("-", 1)[1])
            tensors = {n: (t.float() + 2e-4 * step * direction[n].float()
                           + 5e-4 * pool[n][step:step + t.numel()].float().view(t.shape)).to(dtype)
                       for n, t in base.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config))
    return sum(t.numel() for t in base.values())


def measure(cmd: list[str]) -> dict:
    """Wall time and peak memory (RssAnon and RSS, sampled every 20 ms) of a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"rss": 0, "anon": 0}

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                peak["rss"] = max(peak["rss"], int(fields["VmRSS"].split()[0]) * 1024)
                peak["anon"] = max(peak["anon"], int(fields["RssAnon"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed: {err.decode()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss": peak["rss"], "peak_anon": peak["anon"]}


def lab_run(lab: Path, cutoff: int | None) -> tuple[str, str, int, list[int], list[str], int]:
    """(name, "lab-full" or "lab-lora", parameters, observed steps, input files, target: the last step) of a run."""
    from relex.trajectory import AdapterReader, Trajectory

    trajectory = Trajectory.discover(lab / "base", lab / "run")
    observed = trajectory.observed(cutoff)
    readers = [observed.reader(observed.base)] + [observed.reader(c.path) for c in observed.checkpoints]
    files = [str(f) for reader in readers for f in reader.files]
    kind = "lora" if isinstance(readers[-1], AdapterReader) else "full"
    params = sum(spec.numel for spec in readers[0].specs.values())
    return lab.name, f"lab-{kind}", params, observed.steps, files, trajectory.steps[-1]


def named_budget(budget: str, run: Path) -> str:
    """``whole``: what holds the largest tensor's whole stack (and one output); ``eighth``: an eighth of that."""
    if budget not in ("whole", "eighth"):
        return budget
    from relex.budget import FIXED_OVERHEAD
    from relex.materialize.stream import DeltaStream
    from relex.trajectory import Trajectory

    trajectory = Trajectory.discover(run / "base", run / "run")
    stream = DeltaStream(trajectory, 0, n_outputs=1)
    stack = max(stream.bytes_per_element(s) * s.numel for s in trajectory.tensor_specs().values())
    return str(FIXED_OVERHEAD + (stack if budget == "whole" else -(-stack // 8)))


def time_reference(scratch: Path, target_index: int) -> dict:
    """The reference pipeline's two stages (reference_pipeline.py), each timed as a subprocess; its output is
    left in scratch/reference-out for the comparison with relex's."""
    script = str(Path(__file__).with_name("reference_pipeline.py"))
    store, out = scratch / "reference-deltas", scratch / "reference-out"
    shutil.rmtree(out, ignore_errors=True)
    pre = measure([sys.executable, script, "precompute", str(scratch / "base"), str(scratch / "run"), str(store)])
    ext = measure([sys.executable, script, "extrapolate", str(scratch / "base"), str(store), str(out),
                   "--target-index", str(target_index)])
    store_bytes = sum(f.stat().st_size for f in store.iterdir())
    shutil.rmtree(store)
    return {"reference_seconds": pre["seconds"] + ext["seconds"], "reference_precompute_seconds": pre["seconds"],
            "reference_svd_seconds": ext["seconds"], "reference_peak_anon_bytes": max(pre["peak_anon"], ext["peak_anon"]),
            "reference_store_bytes": store_bytes}


def time_independent(scratch: Path, cutoff: int, target: int, repeat: int) -> dict:
    """The independent implementation (independent_relex.py) as one subprocess, the fastest of ``repeat`` runs;
    its output is left in scratch/independent-out for the comparison with relex's."""
    out = scratch / "independent-out"
    cmd = [sys.executable, str(Path(__file__).with_name("independent_relex.py")), "--base", str(scratch / "base"),
           "--run", str(scratch / "run"), "--cutoff", str(cutoff), "--target", str(target), "--out", str(out)]
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(measure(cmd))
    best = min(runs, key=lambda r: r["seconds"])
    return {"independent_seconds": best["seconds"], "independent_peak_anon_bytes": best["peak_anon"],
            "independent_peak_rss_bytes": best["peak_rss"]}


def compare(other: Path, relex: Path, base: Path) -> dict:
    """How far another implementation's output is from relex's: the share of elements that differ; the largest
    difference in units in the last place of the larger of the two values (in the stored dtype; where w_0 + delta
    nearly cancels, float16 deltas can be off by many of the result's ulps); and the largest difference relative
    to the update, max |a - b| / max |b - base| over the model (float64)."""
    from relex.trajectory import CheckpointReader

    fa, fb, f0 = CheckpointReader(other), CheckpointReader(relex), CheckpointReader(base)
    differ = total = 0
    ulps = worst = scale = 0.0
    for name, spec in fb.specs.items():
        a, b, z = (f.read(name).double() for f in (fa, fb, f0))
        if not b.numel():
            continue
        diff = (a - b).abs()
        differ, total = differ + int((diff > 0).sum()), total + b.numel()
        _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()))  # x = m 2^e, m in [0.5, 1): ulp = eps 2^(e-1)
        ulp = torch.ldexp(torch.full_like(diff, torch.finfo(spec.dtype).eps), exponent - 1)
        ulps = max(ulps, (diff / ulp).max().item())
        worst, scale = max(worst, diff.max().item()), max(scale, (b - z).abs().max().item())
    return {"differ_share": differ / total if total else 0.0, "max_ulps": ulps,
            "max_rel_to_update": worst / scale if scale else worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stored dtype of the run")
    parser.add_argument("--checkpoints", type=int, default=16, help="T, the number of observed checkpoints")
    parser.add_argument("--budget", action="append",
                        help="memory budgets to run: a size, 'whole' or 'eighth' (default: 2GB and 256MB)")
    parser.add_argument("--method", action="append", help="relex extrapolate --method and any flags of its own, "
                                                          "e.g. 'next --next-epochs 20'; repeatable: each is timed "
                                                          "after cat on the same inputs (default relex)")
    parser.add_argument("--drift", choices=["dense", "rank1"], default="dense", help="each tensor's drift direction")
    parser.add_argument("--device", action="append", help="relex extrapolate --device; repeatable (default cpu)")
    parser.add_argument("--reference", action="store_true", help="also time the reference pipeline's algorithm")
    parser.add_argument("--independent", action="store_true",
                        help="also time the independent implementation's algorithm (independent_relex.py; "
                             "full-weight runs)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each timing; the fastest is reported")
    parser.add_argument("--scratch", type=Path, help="where to generate the run (default: a temp folder)")
    parser.add_argument("--keep", type=Path, help="generate the run here, or reuse it if there, and keep it")
    parser.add_argument("--lab-dir", type=Path, help="time a finished run (LAB/base, LAB/run) instead of a synthetic one")
    parser.add_argument("--cutoff", type=int, help="with --lab-dir: the last observed step (default: every checkpoint)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/extrapolate.json"))
    args = parser.parse_args()
    budgets, methods, devices = args.budget or ["2GB", "256MB"], args.method or ["relex"], args.device or ["cpu"]
    scratch = args.lab_dir or args.keep or Path(tempfile.mkdtemp(prefix="relex-bench-", dir=args.scratch))
    try:
        cutoff_flags = []
        if args.lab_dir:
            args.model, args.drift, params, steps, files, target = lab_run(args.lab_dir, args.cutoff)
            args.dtype = "input"
            cutoff_flags = ["--cutoff", str(steps[-1])]
        else:
            steps = list(range(1, args.checkpoints + 1))
            t0 = time.perf_counter()
            if args.keep and (scratch / "base").is_dir():
                params = sum(s[0] * (s[1] if len(s) > 1 else 1) for s in model_shapes(args.model).values())
            else:
                params = generate(scratch, args.model, steps, args.drift, getattr(torch, args.dtype))
            print(f"{args.model}: {params / 1e6:.1f}M params, {args.dtype}, {len(steps)} checkpoints, {args.drift} "
                  f"drift ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
            files = [str(scratch / "base" / "model.safetensors")] + [
                str(scratch / "run" / f"checkpoint-{s}" / "model.safetensors") for s in steps]
            target = 4 * len(steps)
        input_bytes = sum(os.path.getsize(f) for f in files)
        reference = time_reference(scratch, target - 1) if args.reference else {}
        independent = time_independent(scratch, steps[-1], target, args.repeat) if args.independent else {}
        others = {k: scratch / f"{k}-out" for k, on in (("reference", args.reference),
                                                          ("independent", args.independent)) if on}
        rows = []
        for name in budgets:
            budget = named_budget(name, scratch)
            for method in methods:
                cat = min((measure(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]) for _ in range(args.repeat)),
                          key=lambda r: r["seconds"])
                outs = []
                for i, device in enumerate(devices):
                    out = scratch / f"out-{name}-{i}"
                    cmd = [sys.executable, "-m", "relex", "extrapolate", "--base", str(scratch / "base"), "--run",
                           str(scratch / "run"), *cutoff_flags, "--target", str(target), "--out", str(out),
                           "--memory-budget", budget, "--device", device, "--method", *method.split(), "--no-cache",
                           "-q", "--overwrite"]
                    run = min((measure(cmd) for _ in range(args.repeat)), key=lambda r: r["seconds"])
                    outs.append(out / f"step-{target}")
                    rows.append({"model": args.model, "dtype": args.dtype, "method": method, "drift": args.drift,
                                 "device": device, "params": params, "checkpoints": len(steps), "budget": name,
                                 "budget_bytes": int(parse_size(budget)), "input_bytes": input_bytes,
                                 "cat_seconds": cat["seconds"], "relex_seconds": run["seconds"],
                                 "ratio_to_cat": run["seconds"] / cat["seconds"], "peak_anon_bytes": run["peak_anon"],
                                 "peak_rss_bytes": run["peak_rss"], **reference, **independent})
                for key in others:
                    rows[-1][f"{key}_ratio_to_cat"] = rows[-1][f"{key}_seconds"] / cat["seconds"]
                    for stat, value in compare(others[key], outs[0], scratch / "base").items():
                        rows[-1][f"{key}_vs_relex_{stat}"] = value
                if len(outs) > 1:
                    apart = compare(outs[-1], outs[0], scratch / "base")
                    rows[-1]["disagreement_with_" + devices[0]] = apart["max_rel_to_update"]
                for out in outs:
                    shutil.rmtree(out.parent)
        print(f"{'model':14} {'dtype':8} {'method':10} {'device':6} {'budget':>7} {'input':>9} {'cat s':>7} {'relex s':>8} "
              f"{'ratio':>6} {'peak anon':>10} {'peak rss':>10}"
              + "".join(f" {k[:3] + ' s':>7} {k[:3] + '/cat':>7} {k[:3] + '/relex':>9} {k[:3] + ' anon':>9} "
                        f"{k[:3] + ' differ':>10} {k[:3] + ' ulps':>8} {k[:3] + ' rel':>8}" for k in others))
        for r in rows:
            line = (f"{r['model']:14} {r['dtype']:8} {r['method']:10} {r['device']:6} {r['budget']:>7} {r['input_bytes'] / 1e9:>8.2f}G "
                    f"{r['cat_seconds']:>7.2f} {r['relex_seconds']:>8.2f} {r['ratio_to_cat']:>6.2f} "
                    f"{r['peak_anon_bytes'] / 1e6:>9.0f}M {r['peak_rss_bytes'] / 1e6:>9.0f}M")
            for k in others:
                line += (f" {r[k + '_seconds']:>7.1f} {r[k + '_ratio_to_cat']:>7.1f} "
                         f"{r[k + '_seconds'] / r['relex_seconds']:>9.1f} {r[k + '_peak_anon_bytes'] / 1e6:>8.0f}M "
                         f"{100 * r[k + '_vs_relex_differ_share']:>9.3f}% {r[k + '_vs_relex_max_ulps']:>8.0f} "
                         f"{r[k + '_vs_relex_max_rel_to_update']:>8.1e}")
            for key in (k for k in r if k.startswith("disagreement_with_")):
                line += f"  {key.removeprefix('disagreement_with_')} vs {r['device']}: {r[key]:.1e}"
            print(line)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                     "memory_bytes": psutil.virtual_memory().total},
                                         "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    finally:
        for other in ("reference-out", "independent-out"):
            shutil.rmtree(scratch / other, ignore_errors=True)
        if not args.keep and not args.lab_dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
