"""Calibrate the function-space backtest (``--probe``) on finished lab runs where the real future is known.

For each lab folder (tiny or real-LLM lab; full fine-tuning or LoRA), each cutoff C of its report and each
target T = r * C inside the run:
- the probe backtest of the window up to C (probe: the first ``--probe-size`` held-out prompts),
- for every setting scored at the target's horizon: its backtest scores (function space: KL / stopping's KL,
  KL difference in standard errors, greedy agreement gain; weight space: error / stopping's error) and the
  real held-out accuracy of its prediction at T, on prompts disjoint from the probe's,
- the accuracy of stopping (checkpoint C) and of the real checkpoint T,
- what ``--auto --probe`` (at each margin of ``--margins``) and weight-space ``--auto`` write, and its accuracy.
Spearman correlations between each score and the real gap to stopping, pooled over points. Runs are split
by seed into a tuning set (``--tune-seeds``; the margin is picked there) and a held-out set (reported).

    python benchmarks/calibrate_probe.py runs/spread-new/ci-* runs/spread-lora/ci-* --json benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np


def rankdata(x: list[float]) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def num(value: float | None) -> float:
    """A score as a float (strict JSON stores non-finite ones as null)."""
    return float("nan") if value is None else float(value)


def spearman(x: list[float], y: list[float]) -> float:
    keep = [i for i in range(len(x)) if math.isfinite(x[i]) and math.isfinite(y[i])]
    if len(keep) < 3:
        return float("nan")
    rx, ry = rankdata([x[i] for i in keep]), rankdata([y[i] for i in keep])
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's machine type elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def with_margin(probe_rows: list[dict], margin: float) -> list[dict]:
    """The probe rows re-judged at another margin (in standard errors of the paired KL difference)."""
    return [{**r, "margin": margin, "safe": bool(r["kl_diff"] + margin * r["kl_diff_se"] < 0)} for r in probe_rows]


def measure_lab(lab: Path, ratios: list[float], probe_size: int, eval_size: int, margins: list[float],
                cutoffs: list[int] | None, device: str = "cpu", batch_size: int = 512) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from relex import Trajectory
    from relex.analysis.auto import auto_method
    from relex.analysis.backtest import backtest, default_settings, scoring_horizon
    from relex.analysis.probe import Probe, WeightLoader, probe_backtest
    from relex.errors import RelexError
    from relex.eval.scoring import load_tokenizer, score_model
    from relex.lab.llm_lab import lab_task
    from relex.materialize import compute_stats

    report = json.loads((lab / "report.json").read_text())
    task = lab_task(lab)
    probe_prompts = [p.prompt for p in task.heldout[:probe_size]]
    problems = task.heldout[probe_size:probe_size + eval_size]
    traj = Trajectory.discover(lab / "base", lab / "run")
    full = compute_stats(traj, cache=False, progress=False)
    tokenizer = load_tokenizer(lab / "base")
    model = AutoModelForCausalLM.from_pretrained(lab / "base", dtype=torch.float32).to(device).eval()
    loader = WeightLoader(traj)
    loader.check(model)
    settings = {s.label: s for s in default_settings()}

    def accuracy(steps: list[int], weights) -> dict:
        loader.load(model, steps, weights)
        score = score_model(model, tokenizer, task, batch_size=batch_size, problems=problems)
        return {"accuracy": score.accuracy, "stderr": score.stderr}

    out = {"lab": str(lab), "seed": report.get("seed"), "lora": report.get("lora") is not None,
           "profile": report.get("profile"), "eval_n": len(problems), "probe_n": len(probe_prompts), "cutoffs": []}
    for cutoff in cutoffs or report["cutoffs"]:
        observed = traj.observed(cutoff)
        window = {n: s.subset(observed.steps) for n, s in full.items()}
        rows = backtest(window)
        started = time.perf_counter()
        probe = Probe(observed, probe_prompts, raw_prompts=True, max_new_tokens=task.max_new_tokens, device=device)
        probe_rows = probe_backtest(probe, window, rows)
        probe_seconds = time.perf_counter() - started
        stop = accuracy(observed.steps, np.eye(len(observed.steps))[-1])
        entry = {"cutoff": cutoff, "stop": stop, "probe_seconds": round(probe_seconds, 2), "targets": []}
        for ratio in ratios:
            target = round(ratio * cutoff)
            if target not in traj.steps:
                continue
            steps = [s for s in traj.steps if s <= target]
            real = accuracy(steps, np.eye(len(steps))[-1])
            h = scoring_horizon(rows, target / cutoff)
            points = []
            for row in (r for r in probe_rows if r["horizon"] == h):
                method = settings[row["setting"]].build(observed.steps)
                weights = {n: method.weights(s, [target])[0] for n, s in window.items()}
                wrow = next(r for r in rows if r["setting"] == row["setting"] and r["horizon"] == h)
                acc = accuracy(observed.steps, weights)
                points.append({"setting": row["setting"], "horizon": h, "kl_vs_stay": row["kl_vs_stay"],
                               "kl_z": row["kl_diff"] / row["kl_diff_se"] if row["kl_diff_se"] > 0 else float("nan"),
                               "agreement_gain": row["agreement"] - row["agreement_stop"],
                               "error_vs_stay": wrow["error_vs_stay"], **acc,
                               "gap": acc["accuracy"] - stop["accuracy"]})
            by_label = {p["setting"]: p for p in points}
            decisions = {}
            for name, prows in [("weight", None)] + [(f"probe z={m:g}", with_margin(probe_rows, m)) for m in margins]:
                try:
                    _, written, record = auto_method(window, [target], cutoff, rows=rows, probe_rows=prows)
                    chosen = record["chosen"]
                    point = by_label.get(chosen)
                    decisions[name] = {"wrote": chosen, "accuracy": point and point["accuracy"],
                                       "stderr": point and point["stderr"]}
                except RelexError:
                    decisions[name] = {"wrote": "stop (refused)", **stop}
            entry["targets"].append({"target": target, "ratio": ratio, "real": real, "points": points,
                                     "auto": decisions})
        out["cutoffs"].append(entry)
    return out


def summarize(labs: list[dict], tune: set[int], margins: list[float]) -> dict:
    """Spearman of each score with the real gap, and the --auto figures, on the tuning and the held-out runs."""
    summary = {}
    for split in ("tuning", "held-out"):
        chosen = [lab for lab in labs if (lab["seed"] in tune) == (split == "tuning")]
        points = [(p, c, t) for lab in chosen for c in lab["cutoffs"] for t in c["targets"] for p in t["points"]]
        gaps = [p["gap"] for p, _, _ in points]
        spear = {"probe: -KL/stop": spearman([-num(p["kl_vs_stay"]) for p, _, _ in points], gaps),
                 "probe: -z(KL diff)": spearman([-num(p["kl_z"]) for p, _, _ in points], gaps),
                 "probe: agreement gain": spearman([num(p["agreement_gain"]) for p, _, _ in points], gaps),
                 "weight: -error/stop": spearman([-num(p["error_vs_stay"]) for p, _, _ in points], gaps)}
        within = [spearman([-num(p["kl_vs_stay"]) for p in t["points"]], [p["gap"] for p in t["points"]])
                  for lab in chosen for c in lab["cutoffs"] for t in c["targets"]]
        within = [r for r in within if math.isfinite(r)]
        spear["probe: -KL/stop, median within a (run, C, T)"] = float(np.median(within)) if within else float("nan")
        autos = {}
        for name in ["weight"] + [f"probe z={m:g}" for m in margins]:
            worst, gains, shares, wrote, cases = math.inf, [], [], 0, 0
            for lab in chosen:
                for c in lab["cutoffs"]:
                    for t in c["targets"]:
                        d = t["auto"][name]
                        if d["accuracy"] is None:
                            continue
                        cases += 1
                        se = math.sqrt(d["stderr"] ** 2 + c["stop"]["stderr"] ** 2)
                        gap = d["accuracy"] - c["stop"]["accuracy"]
                        worst = min(worst, gap / se if se > 0 else 0.0)
                        gains.append(gap)
                        if d["wrote"] != "stop (refused)":
                            wrote += 1
                            real_gain = t["real"]["accuracy"] - c["stop"]["accuracy"]
                            shares.append(gap / real_gain if real_gain > 0 else float("nan"))
            autos[name] = {"cases": cases, "extrapolated": wrote, "mean_gap": float(np.mean(gains)) if gains else None,
                           "worst_gap_in_se": worst if math.isfinite(worst) else None,
                           "share_of_real_gain": [round(s, 3) for s in shares]}
        summary[split] = {"runs": len(chosen), "points": len(points), "spearman": spear, "auto": autos}
    tuning = summary["tuning"]["auto"]
    safe = [m for m in margins if (tuning[f"probe z={m:g}"]["worst_gap_in_se"] or 0) >= -2]
    # the best mean gap among margins never 2 SE below stopping; ties go to the larger (more cautious) margin
    summary["margin_chosen_on_tuning"] = (max(safe, key=lambda m: (tuning[f"probe z={m:g}"]["mean_gap"] or 0.0, m))
                                          if safe else max(margins))
    return summary


def print_tables(labs: list[dict], summary: dict, tune: set[int]) -> None:
    print("| run | split | C | T | stop | real at T | best setting by probe (KL/stop) | its gap | best real gap "
          "| Spearman in run | auto weight | auto probe (z=2) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|")
    for lab in labs:
        name = Path(lab["lab"]).parent.name.removeprefix("spread-") + "/" + Path(lab["lab"]).name
        for c in lab["cutoffs"]:
            for t in c["targets"]:
                pts = t["points"]
                best = min(pts, key=lambda p: num(p["kl_vs_stay"]))
                rho = spearman([-num(p["kl_vs_stay"]) for p in pts], [p["gap"] for p in pts])

                def auto(key: str) -> str:
                    d = t["auto"].get(key)
                    if d is None or d["accuracy"] is None:
                        return "-"
                    return f"{d['wrote']} ({100 * (d['accuracy'] - c['stop']['accuracy']):+.1f})"
                print(f"| {name} | {'tune' if lab['seed'] in tune else 'held-out'} | {c['cutoff']} | {t['target']} "
                      f"| {100 * c['stop']['accuracy']:.1f} | {100 * t['real']['accuracy']:.1f} "
                      f"| {best['setting']} ({best['kl_vs_stay']:.2f}) | {100 * best['gap']:+.1f} "
                      f"| {100 * max(p['gap'] for p in pts):+.1f} | {rho:.2f} | {auto('weight')} | {auto('probe z=2')} |")
    for split in ("tuning", "held-out"):
        s = summary[split]
        print(f"\n**{split}** ({s['runs']} runs, {s['points']} points): Spearman with the real gap to stopping: "
              + ", ".join(f"{k} {v:.3f}" for k, v in s["spearman"].items()))
        for name, a in s["auto"].items():
            if not a["cases"]:
                continue
            print(f"- auto {name}: extrapolated {a['extrapolated']}/{a['cases']}, mean gap to stopping "
                  f"{100 * a['mean_gap']:+.2f} points, worst {a['worst_gap_in_se']:+.2f} SE, share of the real gain "
                  f"where it extrapolated {a['share_of_real_gain']}")
    print(f"\nmargin chosen on the tuning runs: z = {summary['margin_chosen_on_tuning']:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", type=Path, help="finished lab folders (with report.json, base/, run/)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=[],
                        help="re-summarize the runs measured in these JSON files (with any new lab folders)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0], help="targets T = ratio * C")
    parser.add_argument("--cutoffs", type=int, nargs="+", help="cutoffs (default: each lab report's)")
    parser.add_argument("--probe-size", type=int, default=200, help="probe prompts (first held-out ones)")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out prompts scored (after the probe's)")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds whose runs tune the margin; the others are held out")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/calibration.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the models run (cuda for the real-LLM lab on a GPU)")
    parser.add_argument("--batch-size", type=int, default=512, help="held-out scoring batch")
    args = parser.parse_args()

    import torch
    import transformers

    import relex
    from relex.jsonout import write_json

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("relex").setLevel(logging.ERROR)
    started = time.perf_counter()
    earlier = [json.loads(path.read_text()) for path in args.from_json]
    labs = [lab for data in earlier for lab in data["labs"]]
    sources = [data["machine"] for data in earlier]
    tune = set(args.tune_seeds)
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> dict:
        """Write everything measured so far (each lab is saved as it completes)."""
        summary = summarize(labs, tune, args.margins)
        machine = {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "relex": relex.__version__,
                   "cpu": cpu_name(), "cores": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        write_json(args.json, {"args": vars(args), "machine": machine, "measured_in": sources, "summary": summary,
                               "labs": labs})
        return {"summary": summary, "machine": machine}

    for lab in args.labs:
        t0 = time.perf_counter()
        labs.append(measure_lab(lab, args.ratios, args.probe_size, args.eval_size, args.margins, args.cutoffs,
                                args.device, args.batch_size))
        print(f"<!-- {lab}: {time.perf_counter() - t0:.1f} s -->", flush=True)
        save()
    done = save()
    print_tables(labs, done["summary"], tune)
    print(f"\n{done['machine']}")


if __name__ == "__main__":
    main()
