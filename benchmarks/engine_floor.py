"""How fast ``relex extrapolate`` could be on this machine with the engine's own kernels: its floor against ``cat``.

Times, on one thread, each step the engine runs on a cache-sized chunk of one tensor's rows (the real
``Block`` of materialize/stream.py on rows in memory): the conversion of the stored values to float64, the
subtraction of the base (exact deltas), the Gram matrix's products, and the weighted sums with their
rounding once to the stored dtype. Per input element, summed over the two passes (Gram, then sums), divided by
the cores, that is the least time the exact float64 engine needs, with no reads, writes, start-up or
imbalance; ``cat`` of a page-cached file of the same bytes gives the read rate the issue's goals compare with.
The two passes are timed on torch's kernels and on the fused ones (materialize/kernels.py, where numba is
installed), and the floor is given for each.

    python benchmarks/engine_floor.py --dtype bfloat16 --checkpoints 8
    python benchmarks/engine_floor.py --dtype float32 --checkpoints 8 --run /tmp/q05   # + the floor for that run

Prints a table and writes JSON. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_extrapolate import lab_run  # noqa: E402

from relex.materialize.stream import Block, _chunk_columns, fused_kernels  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def best_of(repeat: int, fn) -> float:
    """The fastest of ``repeat`` timings of ``fn()`` in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stage_seconds(dtype: torch.dtype, n_steps: int, numel: int, repeat: int) -> dict[str, float]:
    """Seconds per pass over one (T+1) x numel block on one thread, step by step (each cumulative)."""
    gen = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(numel, generator=gen)
    rows = torch.stack([base] + [base + 1e-3 * torch.randn(numel, generator=gen) for _ in range(n_steps)]).to(dtype)
    scratch = torch.empty(n_steps + 1, _chunk_columns(n_steps), dtype=torch.float64)
    block = Block(rows, False, rows[0], torch.device("cpu"), [scratch])
    kernels = fused_kernels()
    fused = Block(rows, False, rows[0], torch.device("cpu"), [scratch], kernels=kernels)
    weights = np.linspace(0.5, 2.0, n_steps)[None, :] / n_steps
    out = [torch.empty(numel, dtype=dtype)]

    def convert() -> None:
        for c0, c1 in block.spans:
            scratch[:, :c1 - c0].copy_(rows[:, c0:c1])

    seconds = {"convert": best_of(repeat, convert),
               "convert + subtract": best_of(repeat, lambda: block.map_chunks(lambda *_: None)),
               "Gram pass": best_of(repeat, block.gram),
               "sums pass": best_of(repeat, lambda: block.weighted_sums(weights, out))}
    if fused.kernels is not None:
        fused.gram()  # compiled (or loaded from numba's cache) before it is timed
        seconds |= {"fused Gram pass": best_of(repeat, fused.gram),
                    "fused sums pass": best_of(repeat, lambda: fused.weighted_sums(weights, out))}
    return seconds


def first_call_seconds(dtype: torch.dtype, n_steps: int) -> float:
    """Seconds of a fresh process's first fused Gram and sums calls on a tiny block: numba's import and its
    cache load (or, the first time on a machine, its compilation), the fixed cost the fused path adds."""
    code = (f"import time, numpy as np, torch; from relex.materialize.stream import Block, fused_kernels\n"
            f"rows = torch.zeros({n_steps + 1}, 64, dtype=torch.{str(dtype).removeprefix('torch.')})\n"
            f"start = time.perf_counter(); b = Block(rows, False, rows[0], torch.device('cpu'), "
            f"[torch.empty({n_steps + 1}, 64, dtype=torch.float64)], kernels=fused_kernels()); b.gram(); "
            f"b.weighted_sums(np.ones((1, {n_steps})), [torch.empty(64, dtype=rows.dtype)]); "
            f"print(time.perf_counter() - start)")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def cat_seconds(paths: list[str], repeat: int) -> float:
    """Fastest ``cat`` of ``paths`` to /dev/null (warm page cache after the first)."""
    cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *paths]
    subprocess.run(cat, check=True)
    return best_of(repeat, lambda: subprocess.run(cat, check=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="stored dtype of the rows")
    parser.add_argument("--checkpoints", type=int, default=8, help="T, the number of observed checkpoints")
    parser.add_argument("--numel", type=int, default=4_000_000, help="elements of the tensor timed")
    parser.add_argument("--cores", type=int, default=torch.get_num_threads(), help="cores the floor divides by")
    parser.add_argument("--run", type=Path, help="a run folder (base/, run/; e.g. bench_extrapolate --keep): "
                                                 "its floor and its files' cat time")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/engine_floor.json"))
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(1)
    seconds = stage_seconds(dtype, args.checkpoints, args.numel, args.repeat)
    elements = (args.checkpoints + 1) * args.numel
    ns = {stage: 1e9 * s / elements for stage, s in seconds.items()}
    floor_ns = (ns["Gram pass"] + ns["sums pass"]) / args.cores  # per input element, both passes, every core busy
    fused_ns = (ns["fused Gram pass"] + ns["fused sums pass"]) / args.cores if "fused Gram pass" in ns else None
    first_call = first_call_seconds(dtype, args.checkpoints) if fused_ns is not None else None
    if args.run:
        _, _, params, steps, files, _ = lab_run(args.run, None)
        run_elements = params * (len(steps) + 1)  # the base and every checkpoint store every tensor
    else:
        with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir(), delete=False) as f:
            f.write(torch.zeros(elements, dtype=dtype).view(torch.uint8).numpy().tobytes())
        files, run_elements = [f.name], elements
    try:
        cat = cat_seconds(files, args.repeat)
    finally:
        if not args.run:
            Path(files[0]).unlink()
    cat_ns = 1e9 * cat / run_elements
    print(f"{args.dtype}, T = {args.checkpoints}, {args.numel} elements a row, one thread, chunks of "
          f"{_chunk_columns(args.checkpoints)} columns; ns per input element (base and T checkpoints):")
    for stage, value in ns.items():
        print(f"  {stage:20s} {value:6.2f}")
    print(f"cat: {cat_ns:.2f} ns per element ({run_elements * dtype.itemsize / cat / 1e9:.1f} GB/s)")
    for name, value in [("torch", floor_ns), ("fused", fused_ns)]:
        if value is not None:
            print(f"{name} floor on {args.cores} cores, both passes, nothing else: {value:.2f} ns per element = "
                  f"{value / cat_ns:.1f}x cat" + (f" = {value * run_elements / 1e9:.2f} s for {args.run}"
                                                  if args.run else ""))
    if first_call is not None:
        print(f"fused kernels' first call in a fresh process (numba import + cache load): {first_call:.2f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "dtype": args.dtype, "checkpoints": args.checkpoints, "numel": args.numel, "cores": args.cores,
        "ns_per_element": ns, "cat_ns_per_element": cat_ns, "floor_ns_per_element": floor_ns,
        "floor_over_cat": floor_ns / cat_ns, "fused_floor_ns_per_element": fused_ns,
        "fused_floor_over_cat": fused_ns / cat_ns if fused_ns else None, "fused_first_call_seconds": first_call,
        "run": str(args.run) if args.run else None, "run_elements": run_elements,
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "torch": torch.__version__}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
