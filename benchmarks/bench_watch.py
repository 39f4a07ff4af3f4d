"""What `relex watch` costs per checkpoint: seconds, bytes read and peak memory as a run grows.

Generates bench_extrapolate's synthetic bf16 run (real model shapes), then hands its checkpoints to a
`relex.live.Watcher` one at a time, as a trainer would, and times each `poll()`: statistics only (no
target), then statistics plus one prediction rewritten per checkpoint. Peak memory is the process's
own (RssAnon), sampled every 20 ms. Prints a table, writes JSON.

    python benchmarks/bench_watch.py --model small --checkpoints 8
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_extrapolate import generate  # noqa: E402


def rss_anon() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) * 1024


def follow(root: Path, staged: Path, steps: list[int], targets: list[int], budget: str) -> list[dict]:
    """Move the staged checkpoints into a fresh run folder one by one; time the watcher's poll after each."""
    from relex.live import Watcher

    run = root / "run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir()
    out = root / "out"
    if out.exists():
        shutil.rmtree(out)
    watcher = Watcher(root / "base", run, targets, out if targets else None, settle=0.0, cache=False,
                      memory_budget=budget)
    rows = []
    for step in steps:
        shutil.copytree(staged / f"checkpoint-{step}", run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        peak = [rss_anon()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], rss_anon())

        thread = threading.Thread(target=sample)
        thread.start()
        read0 = psutil.Process().io_counters().read_chars
        start = time.perf_counter()
        watcher.poll()
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
        rows.append({"step": step, "checkpoints": len(watcher.steps), "seconds": round(seconds, 2),
                     "read_bytes": psutil.Process().io_counters().read_chars - read0, "peak_anon": peak[0]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--budget", default="2GB")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_watch.json"))
    args = parser.parse_args()
    steps = list(range(1, args.checkpoints + 1))  # bench_extrapolate draws its noise at offset = step
    with tempfile.TemporaryDirectory(prefix="relex-bench-watch-") as tmp:
        root = Path(tmp)
        params = generate(root / "gen", args.model, steps)
        shutil.move(root / "gen" / "base", root / "base")
        result = {"model": args.model, "parameters": params, "budget": args.budget,
                  "checkpoint_bytes": (root / "base" / "model.safetensors").stat().st_size,
                  "stats_only": follow(root, root / "gen" / "run", steps, [], args.budget),
                  "with_one_target": follow(root, root / "gen" / "run", steps, [10 * steps[-1]], args.budget)}
    size = result["checkpoint_bytes"]
    print(f"{args.model}: {params / 1e6:.1f}M parameters, {size / 1e6:.0f} MB per checkpoint, budget {args.budget}")
    print(f"{'mode':<16}{'ckpts':>6}{'seconds':>9}{'read (ckpts)':>14}{'peak anon MB':>14}")
    for mode in ("stats_only", "with_one_target"):
        for r in result[mode]:
            print(f"{mode:<16}{r['checkpoints']:>6}{r['seconds']:>9.2f}{r['read_bytes'] / size:>14.1f}"
                  f"{r['peak_anon'] / 1e6:>14.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from relex.jsonout import write_json

    write_json(args.json, result)
    print(args.json)


if __name__ == "__main__":
    main()
