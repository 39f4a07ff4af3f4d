"""Calibrate ``relex extrapolate --verify`` on lab runs: what it publishes against the test set it never sees.

Each case is one lab run (``relex lab``, made here: profile, seed, full fine-tuning or LoRA, CPU kernel set)
extrapolated from its cutoff with RELEX. ``--verify`` races every target x shrink on the lab's
``verify.jsonl`` (the task's distribution, never a held-out problem) against the cutoff checkpoint; the
lab's held-out set is the test set, scored for every candidate and for stopping. Per case and margin:
what was published, its test gain over stopping (paired SE), the oracle's (the best candidate on the test
set) and the share of it captured. The runs are split into tuning and held-out ones by seed BEFORE any is
looked at: the margin is chosen on the tuning runs (the highest mean test gain with no published loss
beyond 2 paired SE) and reported on the held-out ones.

    python benchmarks/verify_calibration.py --seeds 0 1 2 3 4 5 --tune-seeds 0 1 --lora both \\
        --kernels default avx2 --json benchmarks/results/verify_calibration.json

Prints tables and writes JSON. Not a test: lab runs take ~30 s each on 2 cores (profile ci).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from relex.analysis.metrics import mean_stderr
from relex.verify import DEFAULT_MARGIN

MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0)
GRADER = "relex.lab.tasks:Task.verify"  # the lab's reward: exact match


def lab_name(profile: str, seed: int, lora: bool, kernels: str, model: str, lr: float | None) -> str:
    """The folder name of one case's lab run (also its name in the JSON)."""
    name = f"{'' if model == 'tiny' else model + '-'}{profile}-s{seed}-{'lora' if lora else 'full'}-{kernels}"
    return name if lr is None else f"{name}-lr{lr:g}"


def make_lab(root: Path, profile: str, seed: int, lora: bool, kernels: str, model: str = "tiny",
             lr: float | None = None, threads: int = 2) -> Path:
    """A finished lab run in ``root`` (reused when present), its torch kernels set by ATEN_CPU_CAPABILITY. The
    LLM lab's run is trained only (``train_llm_run``): this script scores its candidates itself."""
    out = root / lab_name(profile, seed, lora, kernels, model, lr)
    if model != "tiny":
        if not (out / "verify.jsonl").exists():
            from relex.lab.cli import _with_lr
            from relex.lab.llm_lab import train_llm_run
            from relex.lab.llm_profiles import LLM_PROFILES
            from relex.lab.profiles import LoraSettings

            os.environ["ATEN_CPU_CAPABILITY"] = kernels  # in this process: torch reads it at its first kernel
            train_llm_run(_with_lr(LLM_PROFILES[profile], lr, lora), out, seed, overwrite=True, quiet=True,
                          lora=LoraSettings() if lora else None, threads=threads)
        return out
    if not (out / "report.json").exists():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": kernels}
        cmd = [sys.executable, "-m", "relex", "lab", "--profile", profile, "--seed", str(seed), "--out", str(out),
               "-q", "--overwrite", *(["--lora"] if lora else []), *(["--lr", str(lr)] if lr is not None else [])]
        subprocess.run(cmd, check=True, env=env)
    return out


def score_case(lab: Path, cutoff_frac: float, multiples: list[float], shrinks: list[float], max_new_tokens: int,
               seed: int, last: int | None = None, verify_size: int | None = None) -> dict:
    """The race on verify.jsonl, and every candidate's and stopping's outcomes on the lab's test set."""
    from relex.eval.dataset import read_dataset
    from relex.lab.tasks import make_task
    from relex.materialize import compute_stats
    from relex.methods import Relex
    from relex.trajectory import Trajectory
    from relex.verify import Candidate, ModelScorer, verify

    llm = last is not None  # the LLM lab's run: its test set is heldout.jsonl, graded by math-verify
    if not llm:
        report = json.loads((lab / "report.json").read_text())
        last, spec = report["T"], report["task"]
    cutoff = max(2, round(cutoff_frac * last))
    trajectory = Trajectory.discover(lab / "base", lab / "run").observed(cutoff)
    method = Relex().fit(trajectory, progress=False)
    stats = compute_stats(trajectory, cache=False, progress=False)
    targets = sorted({min(last, round(m * cutoff)) for m in multiples})
    candidates = [Candidate(t, s) for t in targets for s in shrinks]
    options = {"max_new_tokens": max_new_tokens, "grader": None if llm else GRADER}
    start = time.perf_counter()
    problems = read_dataset(lab / "verify.jsonl")[:verify_size]
    scorer = ModelScorer(trajectory, method, stats, problems, **options)
    verdict = verify(candidates, scorer, len(scorer.problems), seed=seed)
    cost = time.perf_counter() - start
    test = read_dataset(lab / "heldout.jsonl") if llm else \
        make_task(spec["task"], spec["digits"], spec["heldout_size"], spec["heldout_seed"]).heldout
    tester = ModelScorer(trajectory, method, stats, test, **options)
    everything = np.arange(len(test))
    stop = tester(None, everything).astype(float)
    on_test = {c: tester(c, everything).astype(float) for c in candidates}
    return {"lab": lab.name, "cutoff": cutoff, "targets": targets, "verify_seconds": cost,
            "verify_answers": sum(len(v) for v in scorer.seen.values()), "verdict": verdict.as_dict(),
            "gain": verdict.confirmation[0], "gain_se": verdict.confirmation[1],
            "pick": [verdict.pick.target, verdict.pick.shrink], "stop_test": stop.mean(),
            "test": {f"{c.target}x{c.shrink:g}": mean_stderr(on_test[c] - stop) for c in candidates}}


def outcome(case: dict, margin: float) -> dict:
    """What ``--verify-margin margin`` would have published in this case, and its gain on the test set."""
    published = case["gain"] > 0 and case["gain"] > margin * case["gain_se"]
    key = f"{case['pick'][0]}x{case['pick'][1]:g}"
    gain, se = case["test"][key] if published else (0.0, 0.0)
    oracle_key = max(case["test"], key=lambda k: case["test"][k][0])
    oracle, oracle_se = case["test"][oracle_key]
    real = oracle > 2 * oracle_se
    return {"published": published, "gain": gain, "se": se, "oracle": max(oracle, 0.0), "oracle_key": oracle_key,
            "real_gain": real, "captured": gain / oracle if real else None,
            "loss_beyond_2se": published and gain < -2 * se, "refused_real": real and not published}


def summary(cases: list[dict], margin: float) -> dict:
    rows = [outcome(c, margin) for c in cases]
    captured = [r["captured"] for r in rows if r["captured"] is not None]
    return {"margin": margin, "cases": len(rows), "published": sum(r["published"] for r in rows),
            "mean_gain": float(np.mean([r["gain"] for r in rows])) if rows else float("nan"),
            "mean_oracle": float(np.mean([r["oracle"] for r in rows])) if rows else float("nan"),
            "worst": min((r["gain"] - 2 * r["se"] for r in rows if r["published"]), default=0.0),
            "losses_beyond_2se": sum(r["loss_beyond_2se"] for r in rows),
            "real_gains": len(captured), "mean_captured": float(np.mean(captured)) if captured else float("nan"),
            "refused_real": sum(r["refused_real"] for r in rows)}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| margin | cases | published | mean test gain | oracle | losses > 2 SE | real gains | captured | refused real |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['margin']:g} | {r['cases']} | {r['published']} | {100 * r['mean_gain']:+.1f} | "
              f"{100 * r['mean_oracle']:+.1f} | {r['losses_beyond_2se']} | {r['real_gains']} | "
              f"{100 * r['mean_captured']:.0f}% | {r['refused_real']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="the lab's model: tiny (default) or smollm2-135m")
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--lr", type=float, help="GRPO learning rate instead of the profile's (not with --lora)")
    parser.add_argument("--verify-size", type=int, help="score only the first N problems of verify.jsonl")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the LLM lab's training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1], help="runs the margin is chosen on")
    parser.add_argument("--lora", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--kernels", nargs="+", default=["default"], help="ATEN_CPU_CAPABILITY values")
    parser.add_argument("--cutoff", type=float, default=0.15, help="cutoff as a share of the run (default 0.15)")
    parser.add_argument("--multiples", type=float, nargs="+", default=[2, 4, 8], help="targets in cutoffs")
    parser.add_argument("--shrinks", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--labs", type=Path, default=Path(tempfile.gettempdir()) / "relex-verify-calibration")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--resume", type=Path, help="a JSON this script wrote: its cases are kept, not run again")
    args = parser.parse_args()
    if args.model != "tiny" and len(args.kernels) > 1:
        parser.error("the LLM lab trains in this process, whose torch kernels are set once: one --kernels per call")

    steps = None
    if args.model != "tiny":
        from relex.lab.llm_profiles import LLM_PROFILES
        steps = LLM_PROFILES[args.profile].rl.steps
    cases = json.loads(args.resume.read_text())["cases"] if args.resume else []
    done = {c["lab"] for c in cases}
    for seed in args.seeds:  # seed outermost: a calibration stopped early holds both kinds of run
        for lora in {"no": [False], "yes": [True], "both": [False, True]}[args.lora]:
            for kernels in args.kernels:
                if lab_name(args.profile, seed, lora, kernels, args.model, None if lora else args.lr) in done:
                    continue
                lab = make_lab(args.labs, args.profile, seed, lora, kernels, args.model, None if lora else args.lr,
                               args.threads)
                case = score_case(lab, args.cutoff, args.multiples, args.shrinks, args.max_new_tokens, seed=0,
                                  last=steps, verify_size=args.verify_size)
                case.update(seed=seed, lora=lora, kernels=kernels, tuning=seed in args.tune_seeds)
                cases.append(case)
                o = outcome(case, DEFAULT_MARGIN)
                if args.json:  # after every case: a long calibration that stops early keeps what it measured
                    save(args.json, {"command": sys.argv, "cases": cases})
                print(f"{lab.name}: pick {case['pick']} confirmation {100 * case['gain']:+.1f} ± "
                      f"{100 * case['gain_se']:.1f}; test {100 * o['gain']:+.1f} (oracle {o['oracle_key']} "
                      f"{100 * o['oracle']:+.1f}); verify {case['verify_seconds']:.1f} s, "
                      f"{case['verify_answers']} answers", flush=True)

    tuning = [c for c in cases if c["tuning"]]
    held = [c for c in cases if not c["tuning"]]
    tune_rows = [summary(tuning, m) for m in MARGINS]
    allowed = [r for r in tune_rows if r["losses_beyond_2se"] == 0] or tune_rows
    chosen = max(allowed, key=lambda r: (r["mean_gain"], r["margin"]))["margin"]
    print_table(f"tuning runs (seeds {args.tune_seeds})", tune_rows)
    print(f"\nchosen margin on the tuning runs: {chosen:g}")
    held_rows = [summary(held, m) for m in MARGINS]
    print_table("held-out runs (every margin shown; the chosen one is the result)", held_rows)
    if args.json:
        save(args.json, {"command": sys.argv, "cases": cases, "tuning": tune_rows, "chosen_margin": chosen,
                         "held_out": held_rows})


def save(path: Path, doc: dict) -> None:
    """``doc`` as JSON with the commit and machine it was measured on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    path.write_text(json.dumps({**doc, "commit": commit, "machine": platform.processor() or platform.machine()},
                               indent=2) + "\n")


if __name__ == "__main__":
    main()
