"""Time ``relex extrapolate`` with the local and the Ray executor on bench_extrapolate's synthetic run, and
check that both write the same bytes.

Both run in this process (the Ray one on a local instance of ``--cpus`` CPUs, started once and warmed up
by a first run), so the times compare the executors, not interpreter or Ray start-up, which are printed
apart. Not a test: numbers depend on the machine.

    python benchmarks/bench_ray.py --model small --budget 256MB
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_extrapolate import MODELS, generate  # noqa: E402

from relex.cli import main as relex  # noqa: E402


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    if relex(args):
        raise SystemExit(f"relex {' '.join(args)} failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--checkpoints", type=int, default=16)
    parser.add_argument("--budget", action="append", help="memory budgets (default 256MB)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scratch", type=Path)
    args = parser.parse_args()
    import ray

    scratch = Path(tempfile.mkdtemp(prefix="relex-bench-ray-", dir=args.scratch))
    try:
        steps = list(range(1, args.checkpoints + 1))
        params = generate(scratch, args.model, steps)
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        print(f"{args.model}: {params / 1e6:.1f}M params, {len(steps)} checkpoints; Ray start "
              f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
        for budget in args.budget or ["256MB"]:
            common = ["extrapolate", "--base", str(scratch / "base"), "--run", str(scratch / "run"), "--target",
                      str(4 * len(steps)), "--memory-budget", budget, "--no-cache", "-q", "--overwrite"]
            warm = timed(common + ["--out", str(scratch / "ray"), "--executor", "ray"])
            times = {"local": [], "ray": []}
            for _ in range(args.repeats):
                for executor in times:
                    times[executor].append(timed(common + ["--out", str(scratch / executor), "--executor", executor]))
            same = files(scratch / "local") == files(scratch / "ray")
            print(f"budget {budget}: local {', '.join(f'{t:.1f}' for t in times['local'])}s; ray "
                  f"{', '.join(f'{t:.1f}' for t in times['ray'])}s (first run {warm:.1f}s); same bytes: {same}")
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
