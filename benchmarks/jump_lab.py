"""RelexCallback(jump_to=...) in the lab: steps saved at equal held-out accuracy, optimizer moments kept or reset.

Three GRPO runs of one lab profile from one base and seed: the plain run, and two runs that jump at step
``--jump-at`` to RELEX's prediction at ``--jump-to`` (fitted on the checkpoints so far) and train on as
step ``--jump-to`` to the profile's last step, one keeping Adam's moments, one clearing them. A jump run's
checkpoint named s (s > jump-to) cost s - (jump-to - jump-at) real steps; the prediction itself cost
jump-at. "Saved" = the first step of the plain run whose accuracy reaches that checkpoint's, minus its
real steps (negative: the jump cost steps; None: the plain run never got there). Prints a table and
writes JSON.

    python benchmarks/jump_lab.py --profile ci --seed 0 --base runs/lab-ci/base
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def train(variant: str, base: Path, out: Path, profile, task, seed: int, jump_at: int, jump_to: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from relex.integrations.trl import RelexCallback
    from relex.lab.rl import run_grpo

    torch.set_num_threads(1)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    callback = None if variant == "plain" else RelexCallback(base=base, jump_at=jump_at, jump_to=jump_to,
                                                             optimizer=variant, cache=False, out=out / "relex")
    start = time.perf_counter()
    run_grpo(policy, tokenizer, task, profile.rl, out / "run", seed, quiet=True,
             callbacks=[callback] if callback else None)
    record = {"variant": variant, "seconds": round(time.perf_counter() - start, 1)}
    if callback is not None:
        record["jumped"] = callback.jumped
        record["status_at_jump"] = callback.history[-1] if callback.history else None
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, help="a lab base (skips pre-training); default: pre-train one")
    parser.add_argument("--jump-at", type=int, default=20)
    parser.add_argument("--jump-to", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/jump-lab"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/jump_lab.json"))
    args = parser.parse_args()

    import torch
    from transformers import set_seed

    from relex.lab.evaluate import score_dirs
    from relex.lab.profiles import PROFILES
    from relex.lab.tasks import make_task

    profile = PROFILES[args.profile]
    task = make_task(profile.task, profile.digits, profile.heldout_size)
    last, shift = profile.rl.steps, args.jump_to - args.jump_at
    if args.out.exists():
        shutil.rmtree(args.out)
    base = args.out / "base"
    if args.base:
        shutil.copytree(args.base, base)
    else:
        from relex.lab.model import build_model
        from relex.lab.pretrain import pretrain
        from relex.lab.tokenizer import build_tokenizer

        torch.set_num_threads(1)
        set_seed(args.seed)
        tokenizer = build_tokenizer(task.alphabet)
        model = build_model(profile.shape, tokenizer, args.seed)
        pretrain(model, tokenizer, task, profile.pretrain, args.seed, quiet=True)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)

    runs = [train(v, base, args.out / v, profile, task, args.seed, args.jump_at, args.jump_to)
            for v in ("plain", "keep", "reset")]

    plain_steps = sorted({*range(args.eval_every, last + 1, args.eval_every), last})
    plain_dirs = {0: base, **{s: args.out / "plain" / "run" / f"checkpoint-{s}" for s in plain_steps}}
    scores = score_dirs(list(plain_dirs.values()), task, tokenizer_dir=base, quiet=True)
    plain = {s: scores[d].accuracy for s, d in plain_dirs.items()}
    stderr = {s: scores[d].stderr for s, d in plain_dirs.items()}
    rows = [{"run": "plain", "named_step": s, "real_steps": s, "accuracy": plain[s], "stderr": stderr[s]}
            for s in plain_dirs]
    for record in runs[1:]:
        v = record["variant"]
        named = sorted({args.jump_to + 1, *range(args.jump_to + args.eval_every, last + 1, args.eval_every), last})
        dirs = {args.jump_to: args.out / v / "relex" / f"step-{args.jump_to}",
                **{s: args.out / v / "run" / f"checkpoint-{s}" for s in named}}
        scores = score_dirs(list(dirs.values()), task, tokenizer_dir=base, quiet=True)
        for s, d in dirs.items():
            real = args.jump_at if s == args.jump_to else s - shift
            acc = scores[d].accuracy
            reached = next((p for p in sorted(plain) if plain[p] >= acc), None)
            rows.append({"run": f"jump, moments {v}", "named_step": s, "real_steps": real, "accuracy": acc,
                         "stderr": scores[d].stderr, "plain_at_real_steps": plain.get(real),
                         "saved": None if reached is None else reached - real})

    print(f"profile {args.profile}, seed {args.seed}: jump at step {args.jump_at} to RELEX's step {args.jump_to}; "
          f"plain evaluated every {args.eval_every} steps (n={len(task.heldout)})")
    print(f"{'run':<22}{'named':>7}{'real':>6}{'accuracy':>10}{'+-':>7}{'plain@real':>12}{'saved':>7}")
    for r in rows:
        plain_real = "" if r.get("plain_at_real_steps") is None else f"{r['plain_at_real_steps']:.4f}"
        saved = "" if r.get("saved") is None else r["saved"]
        print(f"{r['run']:<22}{r['named_step']:>7}{r['real_steps']:>6}{r['accuracy']:>10.4f}{r['stderr']:>7.4f}"
              f"{plain_real:>12}{saved:>7}")
    for record in runs:
        jumped = f", jumped {record['jumped']}" if "jumped" in record else ""
        print(f"{record['variant']}: {record['seconds']} s{jumped}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from relex.jsonout import write_json

    write_json(args.json, {"profile": args.profile, "seed": args.seed, "jump_at": args.jump_at,
                           "jump_to": args.jump_to, "runs": runs, "rows": rows})
    print(args.json)


if __name__ == "__main__":
    main()
