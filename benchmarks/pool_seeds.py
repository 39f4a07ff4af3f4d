"""Pool compare_methods results over seeds: each method's paired gain over stopping, per seed and together.

    python benchmarks/pool_seeds.py benchmarks/results/compare_llm_v2_lr5e-6_s*_cut*.json --validate 64 \
        --json benchmarks/results/pool_llm_v2_lr5e-6.json

Files are grouped into runs by their lab folder and cutoff; a later file of one run fills rows an earlier one
refused (a re-run of some methods). Every run must have scored the same held-out problems (a lab's held-out
set is fixed; its size is checked). Pooled: the per-problem difference to stopping, averaged over the runs,
with its standard error over problems (it holds the seeds fixed), and the standard deviation of the per-run
gains (how much a gain moves from seed to seed: what tells a user how often extrapolating pays).
``--validate K`` also scores the check a user can run without later checkpoints: keep the prediction only if
it beats stopping by ``--margin`` standard errors on the first K problems, and score that choice on the rest;
with several margins, the first fills the per-method table and each gets one summary row over every case.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from relex.analysis.metrics import mean_stderr


def load_runs(paths: list[Path]) -> dict[tuple[str, int], dict]:
    """{(lab, cutoff): {"stop": outcomes, "T": T, (method, target): row}} with re-runs merged in file order."""
    runs: dict[tuple[str, int], dict] = {}
    for path in paths:
        data = json.loads(path.read_text())
        run = runs.setdefault((data["lab"], data["cutoff"]), {"T": data["T"]})
        for row in data["rows"]:
            if row["method"] == "stop":
                run["stop"] = row
            elif not row.get("refused") or (row["method"], row["target"]) not in run:
                run[(row["method"], row["target"])] = row
        run["real_T"] = next(v for k, v in data["real"].items() if k.endswith(f"checkpoint-{data['T']}"))
    return runs


def paired(rows: list[dict], stops: list[dict], problems: slice = slice(None)) -> tuple[float, float]:
    """Mean and standard error over ``problems`` of the per-problem difference to stopping, averaged over runs."""
    columns = [(r["outcomes"][problems], s["outcomes"][problems]) for r, s in zip(rows, stops)]
    n = len(columns[0][0])
    return mean_stderr([sum(int(o[j]) - int(so[j]) for o, so in columns) / len(columns) for j in range(n)])


def validation_check(row: dict, stop: dict, k: int, margin: float) -> dict:
    """What a user with k verifiable problems of their own would do: keep the prediction only when its paired
    gain over stopping on them exceeds ``margin`` standard errors; scored on the remaining problems."""
    mean, se = paired([row], [stop], slice(None, k))
    test, _ = paired([row], [stop], slice(k, None))
    chosen = mean > margin * se and mean > 0
    return {"validation_gain": mean, "validation_stderr": se, "chosen": chosen, "test_gain": test,
            "check_test_gain": test if chosen else 0.0}


def pool(runs: dict[tuple[str, int], dict], validate: int | None = None, margin: float = 2.0) -> list[dict]:
    """One row per (method, target): every run's paired gain, then the pooled one (runs of one cutoff); with
    ``validate``, each run's validation check on its first ``validate`` problems, scored on the rest."""
    sizes = {len(r["stop"]["outcomes"]) for r in runs.values()}
    if len(sizes) != 1:
        raise SystemExit(f"the runs scored different held-out sets (sizes {sorted(sizes)}): they cannot be paired")
    seen = dict.fromkeys(k for r in runs.values() for k in r if isinstance(k, tuple))  # compare_methods' order
    keys = sorted(seen, key=lambda k: k[1])
    out = []
    for method, target in keys:
        found = [(lab, r[(method, target)], r["stop"]) for (lab, _), r in runs.items()
                 if (method, target) in r and not r[(method, target)].get("refused")]
        if not found:
            continue
        per_run = [{"lab": lab, "vs_stop": row["vs_stop"], "stderr": row["vs_stop_stderr"],
                    "accuracy": row["accuracy"], "weight_error": row["weight_error"],
                    **(validation_check(row, stop, validate, margin) if validate else {})} for lab, row, stop in found]
        mean, se = paired([row for _, row, _ in found], [stop for *_, stop in found])
        gains = [p["vs_stop"] for p in per_run]
        out.append({"method": method, "target": target, "runs": per_run, "pooled": mean, "pooled_stderr": se,
                     "between_run_sd": statistics.stdev(gains) if len(gains) > 1 else None,
                     "above_2se": sum(p["vs_stop"] > 2 * p["stderr"] for p in per_run),
                     "below_2se": sum(p["vs_stop"] < -2 * p["stderr"] for p in per_run)})
    return out


def check_summary(runs: dict[tuple[str, int], dict], validate: int, margin: float) -> dict:
    """The validation check at one margin over every (run, cutoff, method, target) case: how many it kept, its
    mean test gain against always keeping the prediction, the worst test gain it kept, losses kept, gains passed up."""
    cases = [validation_check(row, run["stop"], validate, margin) for run in runs.values()
             for key, row in run.items() if isinstance(key, tuple) and not row.get("refused")]
    kept = [c["test_gain"] for c in cases if c["chosen"]]
    return {"margin": margin, "cases": len(cases), "kept": len(kept),
            "always": statistics.mean(c["test_gain"] for c in cases),
            "check": statistics.mean(c["check_test_gain"] for c in cases),
            "worst_kept": min(kept, default=None), "losses_kept": sum(g < 0 for g in kept),
            "losses": sum(c["test_gain"] < 0 for c in cases),
            "gains_passed_up": sum(c["test_gain"] > 0 and not c["chosen"] for c in cases),
            "gains": sum(c["test_gain"] > 0 for c in cases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="compare_methods.py JSON files")
    parser.add_argument("--validate", type=int, metavar="K",
                        help="also score a validation check: decide on the first K held-out problems, test on the rest")
    parser.add_argument("--margin", type=float, nargs="+", default=[2.0],
                        help="--validate: standard errors by which the prediction must beat stopping (default 2); "
                             "several print one summary row each")
    parser.add_argument("--json", type=Path, help="also write the pooled rows here")
    args = parser.parse_args()
    runs = load_runs(args.files)
    result = {}
    for cutoff in sorted({c for _, c in runs}):
        these = {key: run for key, run in sorted(runs.items()) if key[1] == cutoff}
        result[cutoff] = rows = pool(these, args.validate, args.margin[0])
        print(f"cutoff {cutoff}, {len(these)} runs; accuracy in %, gains are paired differences to stopping:")
        for i, ((lab, _), run) in enumerate(these.items()):
            print(f"  run {i}: {lab}: stop {100 * run['stop']['accuracy']:.1f}, real at T={run['T']} "
                  f"{100 * run['real_T']['accuracy']:.1f}")
        print(f"{'method':>10} {'target':>6} " + " ".join(f"{'run ' + str(i):>13}" for i in range(len(these)))
              + f" {'pooled':>13} {'seed sd':>7} {'>2SE':>4} {'<-2SE':>5}")
        for r in rows:
            cells = {p["lab"]: f"{100 * p['vs_stop']:+.1f} ± {100 * p['stderr']:.1f}" for p in r["runs"]}
            by_run = [cells.get(lab, "-") for lab, _ in these]
            sd = f"{100 * r['between_run_sd']:.1f}" if r["between_run_sd"] is not None else "-"
            pooled = f"{100 * r['pooled']:+.1f} ± {100 * r['pooled_stderr']:.1f}"
            print(f"{r['method']:>10} {r['target']:>6} " + " ".join(f"{c:>13}" for c in by_run)
                  + f" {pooled:>13} {sd:>7} {r['above_2se']:>4} {r['below_2se']:>5}")
        if args.validate:
            print(f"validation check (first {args.validate} problems decide at {args.margin[0]:g} SE; the other "
                  "problems score it): gain over stopping on the test problems, mean over runs, in points")
            print(f"{'method':>10} {'target':>6} {'chosen':>7} {'check':>7} {'always':>7}  per run: validation -> test")
            for r in rows:
                runs_ = r["runs"]
                check = 100 * sum(p["check_test_gain"] for p in runs_) / len(runs_)
                always = 100 * sum(p["test_gain"] for p in runs_) / len(runs_)
                detail = ", ".join(f"{100 * p['validation_gain']:+.1f}{'*' if p['chosen'] else ''} -> "
                                   f"{100 * p['test_gain']:+.1f}" for p in runs_)
                print(f"{r['method']:>10} {r['target']:>6} {sum(p['chosen'] for p in runs_):>3}/{len(runs_):<3} "
                      f"{check:>+7.1f} {always:>+7.1f}  {detail}")
    summary = [check_summary(runs, args.validate, m) for m in args.margin] if args.validate else []
    if summary:
        print("validation check over every run, cutoff, method and target (test gains in points):")
        print(f"{'margin':>6} {'kept':>7} {'always':>7} {'check':>7} {'worst kept':>10} {'losses kept':>11} "
              f"{'gains passed up':>15}")
        for s in summary:
            worst = f"{100 * s['worst_kept']:+.1f}" if s["worst_kept"] is not None else "-"
            print(f"{s['margin']:>6g} {s['kept']:>3}/{s['cases']:<3} {100 * s['always']:>+7.1f} {100 * s['check']:>+7.1f} "
                  f"{worst:>10} {s['losses_kept']:>5}/{s['losses']:<5} {s['gains_passed_up']:>7}/{s['gains']:<7}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"files": [str(p) for p in args.files], "check_summary": summary,
                                         "cutoffs": {str(c): rows for c, rows in result.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
