"""Does the backtest tell the truth? Lab runs where the real future is known.

For each lab run (profile x seed) of L GRPO steps, cutoffs at 7.5% and 10% of L (at least step 6, so
the window can be backtested) and targets T = L/2 and 2T = L (the lab's 15%/20% of T, with 2T inside
the run so its real checkpoint exists):
- the backtest's predicted relative weight error of plain RELEX at the tested horizon nearest T/C,
- the real relative weight error of RELEX at T and 2T (from the Gram over the whole run),
- held-out accuracy of the base, the real checkpoint, plain RELEX, and ``--auto --clip`` (which writes
  the target or, beyond its safe horizon, the safe step instead; "refused" when it supports nothing),
and the Spearman rank correlation between predicted and real errors. Prints a table, writes JSON.

    python benchmarks/trust_lab.py --profile default --seeds 0 1 2 3
    python benchmarks/trust_lab.py --profile ci --seeds 0 1 --lab-dir runs/lab-default
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def measure_run(out: Path, profile, seed: int) -> list[dict]:
    from relex import Relex, Trajectory, compute_stats, extrapolate
    from relex.analysis import alignment
    from relex.analysis.auto import auto_method
    from relex.analysis.backtest import backtest, scoring_horizon
    from relex.errors import RelexError
    from relex.lab.evaluate import score_dirs
    from relex.lab.tasks import make_task

    traj = Trajectory.discover(out / "base", out / "run")
    last = traj.steps[-1]
    full = compute_stats(traj, cache=out / ".relex-cache", progress=False)
    task = make_task(profile.task, profile.digits, profile.heldout_size)
    scratch = out / "trust-outputs"
    rows = []
    for cutoff in sorted({max(6, round(fraction * last)) for fraction in (0.075, 0.10)}):  # 6: room to backtest
        observed = [s for s in traj.steps if s <= cutoff]
        window = {n: s.subset(observed) for n, s in full.items()}
        bt = backtest(window)
        for target in (last // 2, last):
            ratio = target / cutoff
            h = scoring_horizon(bt, ratio)
            predicted = next(r for r in bt if r["setting"] == "relex linear" and r["horizon"] == h)
            real = alignment(Relex(), full, observed, [target])[0]
            [relex_dir] = extrapolate(Relex(cutoff=cutoff).fit(traj), scratch / f"relex-c{cutoff}", [target],
                                      overwrite=True, cache=out / ".relex-cache", progress=False)
            try:
                method, written, record = auto_method(window, [target], cutoff, clip=True)
                [auto_dir] = extrapolate(method.fit(traj), scratch / f"auto-c{cutoff}-t{target}", written,
                                         overwrite=True, cache=out / ".relex-cache", progress=False)
                auto = {"chosen": record["chosen"], "safe_horizon": record["safe_horizon"], "step": written[0]}
            except RelexError as exc:
                auto_dir, auto = None, {"chosen": "refused", "reason": str(exc)}
            dirs = [out / "base", out / "run" / f"checkpoint-{target}", relex_dir] + ([auto_dir] if auto_dir else [])
            scores = score_dirs(dirs, task, tokenizer_dir=out / "base", quiet=True)
            acc = [scores[d].accuracy for d in dirs]
            rows.append({"profile": profile.name, "seed": seed, "T_run": last, "cutoff": cutoff, "target": target,
                         "ratio": ratio, "backtest_horizon": h, "predicted_error": predicted["relative_error"],
                         "real_error": real["relative_error"], "real_cosine": real["mean_cosine"],
                         "real_norm_ratio": real["mean_norm_ratio"], "acc_base": acc[0], "acc_real": acc[1],
                         "acc_relex": acc[2], "acc_auto": acc[3] if auto_dir else acc[0],
                         "stderr": scores[dirs[1]].stderr, "auto": auto})
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--runs", type=Path, default=Path("runs/trust"), help="lab runs (reused when present)")
    parser.add_argument("--lab-dir", type=Path, action="append", default=[],
                        help="also measure this finished `relex lab` output (repeatable)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/trust_lab.json"))
    args = parser.parse_args()
    from relex.lab.lab import run_lab
    from relex.lab.profiles import PROFILES

    profile = PROFILES[args.profile]
    rows = []
    for lab_dir in args.lab_dir:
        meta = json.loads((lab_dir / "report.json").read_text())
        rows += measure_run(lab_dir, PROFILES[meta["profile"]], meta["seed"])
    for seed in args.seeds:
        out = args.runs / f"{args.profile}-s{seed}"
        if not (out / "run").is_dir():
            start = time.perf_counter()
            run_lab(profile, out, seed=seed, overwrite=True, quiet=True)
            print(f"lab {args.profile} seed {seed}: {time.perf_counter() - start:.0f}s", flush=True)
        rows += measure_run(out, profile, seed)
    print(f"{'run':>12} {'C':>4} {'T':>4} {'T/C':>5} {'bt h':>4} {'pred err':>8} {'real err':>8} {'cos':>5} "
          f"{'norm':>5} {'base':>6} {'real':>6} {'relex':>6} {'auto':>6}  auto choice")
    for r in rows:
        choice = r["auto"]["chosen"] + (f" -> step {r['auto']['step']}" if "step" in r["auto"] else "")
        print(f"{r['profile'] + '-s' + str(r['seed']):>12} {r['cutoff']:>4} {r['target']:>4} {r['ratio']:>5.1f} "
              f"{r['backtest_horizon']:>4g} {r['predicted_error']:>8.3f} {r['real_error']:>8.3f} "
              f"{r['real_cosine']:>5.2f} {r['real_norm_ratio']:>5.2f} {r['acc_base']:>6.3f} {r['acc_real']:>6.3f} "
              f"{r['acc_relex']:>6.3f} {r['acc_auto']:>6.3f}  {choice}")
    rho = spearman([r["predicted_error"] for r in rows], [r["real_error"] for r in rows])
    worse = sum(r["acc_auto"] < r["acc_base"] - 2 * r["stderr"] for r in rows)
    print(f"Spearman(predicted, real error) = {rho:.3f} over {len(rows)} cases; "
          f"--auto below base by > 2 stderr in {worse}/{len(rows)} cases")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    args.json.write_text(json.dumps({"profile": asdict(profile), "rows": rows, "spearman": rho}, indent=2,
                                    default=str) + "\n")


if __name__ == "__main__":
    main()
