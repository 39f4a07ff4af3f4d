"""Re-grade an LLM lab run's models strictly: the held-out completions graded by plain math-verify and by
`relex.eval.grading.grade` (which refuses arithmetic restated for the grader to evaluate), side by side.

Greedy-decodes the lab's held-out set (its own prompts and token budget) with each model folder, counts both
verdicts, keeps every completion in the JSON (to read what a model learned), prints a markdown table:

    python benchmarks/regrade_lab.py --lab-dir runs/llm-cpu base run/checkpoint-4 extrapolated/relex-cut4/step-24
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab-dir", type=Path, required=True, help="a finished `relex lab --model ...` folder")
    parser.add_argument("models", nargs="+", help="model folders, relative to the lab folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/regrade.json"))
    args = parser.parse_args()
    import torch

    from relex.jsonout import write_json
    from relex.eval.scoring import greedy_completions, load_model, load_tokenizer
    from relex.eval.grading import final_answer, grade
    from relex.lab.llm_lab import lab_task

    torch.set_num_threads(args.threads)
    task = lab_task(args.lab_dir)
    tokenizer = load_tokenizer(args.lab_dir / "base")
    problems = task.heldout
    rows = []
    for name in args.models:
        texts = greedy_completions(load_model(args.lab_dir / name), tokenizer, problems, task.max_new_tokens)
        lenient = [final_answer(t, p.answer)[0] for t, p in zip(texts, problems, strict=True)]
        strict = [grade(t, p.answer) for t, p in zip(texts, problems, strict=True)]
        n = len(problems)
        row = {"model": name, "n": n, "lenient": sum(lenient) / n, "strict": sum(strict) / n,
               "completions": [{"answer": p.answer, "text": t, "lenient": a, "strict": b}
                               for p, t, a, b in zip(problems, texts, lenient, strict, strict=True)]}
        rows.append(row)
        se = math.sqrt(row["strict"] * (1 - row["strict"]) / n)
        print(f"| {name} | {100 * row['lenient']:.1f} | {100 * row['strict']:.1f} ± {100 * se:.1f} | "
              f"{texts[0][:60]!r} |", flush=True)
        write_json(args.json, {"lab": str(args.lab_dir), "max_new_tokens": task.max_new_tokens, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
