"""How often a GRPO group gets all-equal rewards (no policy gradient) at theta_0, by arithmetic kind.

Samples ``--group`` completions for ``--prompts`` problems of each kind (sum, difference, product, as the
lab's math task draws them) from SmolLM2-135M-Instruct at ``--temperature``, grades them with the lab's
strict grader and prints the mean reward and the share of groups whose rewards are all equal; ``--json``
writes them. It sizes a lab profile: a step has a gradient only if some group's rewards differ.

    python benchmarks/zero_std_groups.py --json benchmarks/results/zero_std.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from relex.eval.grading import grade
from relex.lab.math_task import INSTRUCTION, arithmetic_problem, chat_renderer
from relex.lab.pretrained import ensure_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="problems of each kind (default 8)")
    parser.add_argument("--group", type=int, default=8, help="completions per problem, GRPO's G (default 8)")
    parser.add_argument("--tokens", type=int, default=48, help="completion budget (default 48, the cpu profile's)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    path = ensure_model("smollm2-135m", quiet=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    render = chat_renderer(tok)
    out = {"settings": vars(args), "kinds": {}}
    print(f"{'kind':>4} {'mean reward':>11} {'all-equal groups':>16} {'seconds':>7}")
    for kind in "+-*":
        problems = [arithmetic_problem(kind, rng) for _ in range(args.prompts)]
        enc = tok([render(f"{q}\n{INSTRUCTION}") for q, _ in problems], return_tensors="pt", padding=True)
        start = time.time()
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=args.tokens, num_return_sequences=args.group,
                                 pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        rewards = [[grade(texts[i * args.group + j], str(answer)) for j in range(args.group)]
                   for i, (_, answer) in enumerate(problems)]
        row = {"mean_reward": sum(map(sum, rewards)) / (args.prompts * args.group),
               "all_equal_groups": sum(len(set(r)) == 1 for r in rewards) / args.prompts,
               "per_prompt_reward": [sum(r) / args.group for r in rewards], "seconds": round(time.time() - start, 1)}
        out["kinds"][kind] = row
        print(f"{kind:>4} {row['mean_reward']:>11.3f} {row['all_equal_groups']:>16.3f} {row['seconds']:>7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
