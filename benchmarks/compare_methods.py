"""Every method on one lab run, side by side: accuracy, weight error, wall time and peak memory.

Runs ``relex extrapolate --method NAME`` (a subprocess, timed, memory sampled from /proc) from one
cutoff to the targets T and 2T (T = the run's last step), scores every output on the lab task, and
adds logits extrapolation (scored by decoding; it writes no weights) and the baseline every method
must beat, ``stop``: the cutoff checkpoint itself, with each accuracy's paired difference to it (every model
answers the same held-out problems: the per-problem difference's standard error, smaller than two accuracies'
unpaired ones when the models agree on most problems; the JSON keeps each model's right/wrong string).
ExPO takes one target per run, with alpha = (target - cutoff) / cutoff, i.e. aimed at the same step.
NExt runs twice: as published (no step input) and with the step input (``next+step``).
Works on full fine-tune and LoRA lab runs (``relex lab --lora``: real checkpoints are adapters, merged onto
the base to be scored and compared).
Works on LLM lab runs too (``relex lab --model smollm2-135m``: the chat-templated math task graded by
math-verify, rebuilt from the run's report). ``auto`` is ``relex extrapolate --auto --force`` (the method
its backtest picks, written even beyond the safe horizon it reports). Prints a table, writes JSON.

    python benchmarks/compare_methods.py --lab-dir runs/lab-default
    python benchmarks/compare_methods.py --lab-dir runs/lab-default-lora --json benchmarks/results/compare_lora.json
    python benchmarks/compare_methods.py --lab-dir runs/llm-cpu --cutoff 4 --methods alpharl expo logits --json benchmarks/results/compare_llm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_extrapolate import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab-dir", type=Path, required=True, help="a finished `relex lab` output folder")
    parser.add_argument("--cutoff", type=int, help="last observed step (default: the lab's first cutoff)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/compare_methods.json"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for extrapolating and scoring (default 1, as in the lab: a second "
                             "busy-waiting thread on a shared 2-core machine makes decoding several times slower)")
    parser.add_argument("--device", default="cpu", help="where outputs are scored: cpu (default) or cuda")
    parser.add_argument("--methods", nargs="+", metavar="NAME",
                        help="only these (of relex two-point alpharl next next+step auto expo logits; default all): "
                             "on a 135M model each scored output costs minutes on a CPU")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from relex.lab.evaluate import load_model, load_tokenizer, score_dirs, score_logits_extrapolation
    from relex.lab.llm_lab import lab_task
    from relex.lab.weights import relative_weight_error

    lab = args.lab_dir
    meta = json.loads((lab / "report.json").read_text())
    task = lab_task(lab)
    last, cutoff = meta["T"], args.cutoff or meta["cutoffs"][0]
    targets = [last, 2 * last]
    scratch = lab / f"compare-outputs-cut{cutoff}"  # per cutoff: two cutoffs of one lab can run side by side
    shutil.rmtree(scratch, ignore_errors=True)
    runs = [("relex", "relex", [], targets), ("two-point", "two-point", [], targets),
            ("alpharl", "alpharl", [], targets), ("next", "next", [], targets),
            ("next+step", "next", ["--next-step-input"], targets), ("auto", "relex", ["--auto", "--force"], targets)]
    runs += [("expo", "expo", ["--expo-alpha", str((t - cutoff) / cutoff)], [t]) for t in targets]
    wanted_methods = set(args.methods or [label for label, *_ in runs] + ["logits"])
    runs = [r for r in runs if r[0] in wanted_methods]
    adapter_base = lab / "base" if meta.get("lora") else None
    rows = []
    for label, method, extra, wanted in runs:
        out = scratch / f"{label}-{wanted[0]}"
        cmd = [sys.executable, "-m", "relex", "extrapolate", "--base", str(lab / "base"), "--run", str(lab / "run"),
               "--cutoff", str(cutoff), "--method", method, "--out", str(out), "--threads", str(args.threads),
               "--no-cache", "-q", *extra]
        for t in wanted:
            cmd += ["--target", str(t)]
        try:
            cost = measure(cmd)
        except SystemExit as refusal:  # e.g. --auto on a window too short to backtest: an outcome, not a crash
            reason = str(refusal).strip().splitlines()[-1].split("relex: error: ")[-1]
            rows += [{"method": label, "target": t, "accuracy": None, "stderr": None, "weight_error": None,
                      "seconds": None, "peak_anon_bytes": None, "refused": reason} for t in wanted]
            continue
        scores = score_dirs([out / f"step-{t}" for t in wanted], task, tokenizer_dir=lab / "base", quiet=True,
                            device=args.device)
        for t in wanted:
            real = lab / "run" / f"checkpoint-{t}"
            score = scores[out / f"step-{t}"]
            rows.append({"method": label, "target": t, "score": score, "weight_error":
                         relative_weight_error(out / f"step-{t}", real, lab / "base")
                         if real.is_dir() else None,
                         "seconds": cost["seconds"], "peak_anon_bytes": cost["peak_anon"]})
    anchor, cut = (load_model(d, b).to(args.device) for d, b in [(lab / "base", None),
                                                                  (lab / "run" / f"checkpoint-{cutoff}", adapter_base)])
    tokenizer = load_tokenizer(lab / "base")
    for t in targets if "logits" in wanted_methods else []:
        start = time.perf_counter()
        score = score_logits_extrapolation(anchor, cut, t / cutoff, tokenizer, task)
        rows.append({"method": "logits", "target": t, "score": score, "weight_error": None,
                     "seconds": time.perf_counter() - start, "peak_anon_bytes": None})
    real_scores = score_dirs([lab / "base", lab / "run" / f"checkpoint-{cutoff}", lab / "run" / f"checkpoint-{last}"],
                             task, tokenizer_dir=lab / "base", quiet=True, adapter_base=adapter_base,
                             device=args.device)
    stop = real_scores[lab / "run" / f"checkpoint-{cutoff}"]  # the baseline: keep the cutoff checkpoint
    rows.insert(0, {"method": "stop", "target": last, "score": stop,
                    "weight_error": relative_weight_error(lab / "run" / f"checkpoint-{cutoff}",
                                                          lab / "run" / f"checkpoint-{last}", lab / "base"),
                    "seconds": 0.0, "peak_anon_bytes": None})
    shutil.rmtree(scratch, ignore_errors=True)
    for r in rows:  # accuracy, and its paired difference to stopping on the same held-out problems
        score = r.pop("score", None)
        if score is not None:
            r["vs_stop"], r["vs_stop_stderr"] = score.minus(stop)
            r.update(score.as_dict())
    kind = f"LoRA rank {meta['lora']['rank']}" if meta.get("lora") else "full fine-tune"
    print(f"lab {meta['profile']} ({kind}) seed {meta['seed']}, cutoff {cutoff}, T = {last}; accuracy of base "
          f"{real_scores[lab / 'base'].accuracy:.3f}, real at cutoff {stop.accuracy:.3f}, real at T "
          f"{real_scores[lab / 'run' / f'checkpoint-{last}'].accuracy:.3f}")
    print(f"{'method':>10} {'target':>6} {'accuracy':>14} {'vs stop, paired':>16} {'weight err':>10} {'seconds':>8} "
          f"{'peak anon':>10}")
    for r in rows:
        if r.get("refused"):
            print(f"{r['method']:>10} {r['target']:>6}  refused: {r['refused']}")
            continue
        err = f"{r['weight_error']:.3f}" if r["weight_error"] is not None else "-"
        mem = f"{r['peak_anon_bytes'] / 1e6:.0f}M" if r["peak_anon_bytes"] else "-"
        vs = f"{r['vs_stop']:+.3f} ± {r['vs_stop_stderr']:.3f}"
        print(f"{r['method']:>10} {r['target']:>6} {r['accuracy']:>8.3f} ± {r['stderr']:.3f} {vs:>16} {err:>10} "
              f"{r['seconds']:>8.1f} {mem:>10}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"lab": str(lab), "lora": meta.get("lora"), "cutoff": cutoff, "T": last, "rows": rows,
                                     "real": {str(k): v.as_dict() for k, v in real_scores.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
