"""`relex eval MODEL... --dataset FILE.jsonl`: greedy pass@1 of model folders on verifiable problems.

A product command: it needs the eval extra (transformers, math-verify), not the lab. The lab, when installed,
adds its own task options to this parser (``relex.lab.cli``).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to a ``relex`` subparsers object; the parser is returned for the lab to extend."""
    ev = subparsers.add_parser("eval", help="greedy pass@1 of model folders on verifiable problems")
    ev.add_argument("models", nargs="*", type=Path, metavar="MODEL_DIR", help="HF model (or LoRA adapter) folders")
    ev.add_argument("--dataset", type=Path, metavar="FILE.jsonl",
                    help="JSON lines with 'prompt' and 'answer': chat template applied, greedy, math-verify grading")
    ev.add_argument("--score-only", action="store_true",
                    help="print only the accuracy, one number per line (for relex backtest --eval-command)")
    ev.add_argument("--tokenizer", type=Path, help="tokenizer folder for models that carry none (default: --base)")
    ev.add_argument("--base", type=Path, help="base model that LoRA adapter folders are merged onto; also the "
                                              "tokenizer of models that carry none when --tokenizer is not given")
    ev.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                    help="with --dataset: HF generate (default) or vLLM (a CUDA GPU, or vLLM's CPU build)")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="with --dataset: generation budget (default 512)")
    ev.add_argument("--batch-size", type=int, default=512, help="prompts per generate call (default 512)")
    ev.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's, one per core)")
    ev.add_argument("--json", type=Path, help="also write the scores as JSON here")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print nothing but errors")
    ev.set_defaults(func=cmd_eval)
    return ev


def quiet_models(quiet: bool) -> None:
    """Offline mode; transformers' own bars and deprecation notices off (relex draws its own); all warnings off
    with ``quiet``. Call before transformers is imported, so that its offline switches take effect."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    if quiet:
        warnings.filterwarnings("ignore")


def check_models(models: list[Path]) -> None:
    """Refuse a folder that is neither a model (config.json) nor a LoRA adapter, naming every such folder."""
    from relex.errors import RelexError
    from relex.trajectory.peft import is_adapter_folder

    missing = [str(m) for m in models if not (m / "config.json").is_file() and not is_adapter_folder(m)]
    if missing:
        raise RelexError(f"not a model or adapter folder (no config.json or adapter_config.json): {', '.join(missing)}")


def cmd_eval(args: argparse.Namespace) -> int:
    """``relex eval MODEL... --dataset FILE.jsonl``; without ``--dataset`` only the lab's tasks can be scored."""
    from relex.errors import RelexError

    if args.dataset is None:
        raise RelexError("give --dataset FILE.jsonl (JSON lines with 'prompt' and 'answer'); scoring on a lab task "
                         "(--profile, --task) needs the lab extra: pip install 'relex-rlvr[lab]'")
    if not args.models:
        raise RelexError("give model folders to score")
    check_models(args.models)
    try:
        quiet_models(args.quiet or args.score_only)
        import math_verify  # noqa: F401  graded after the first model has run: missing, say so before
    except ImportError:
        raise RelexError("relex eval runs the models: it needs the eval extra (pip install 'relex-rlvr[eval]')") \
            from None
    return eval_dataset(args)


def eval_dataset(args: argparse.Namespace) -> int:
    """Greedy pass@1 of each model on ``--dataset``, graded by math-verify, with its standard error."""
    from relex.errors import RelexError
    from relex.eval.dataset import read_dataset, score_dataset

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise RelexError(f"--max-new-tokens {args.max_new_tokens} and --batch-size {args.batch_size} must be >= 1")
    items = read_dataset(args.dataset)
    try:
        scores = score_dataset(args.models, items, args.backend, args.max_new_tokens, args.batch_size,
                               tokenizer_dir=args.tokenizer or args.base, adapter_base=args.base,
                               quiet=args.quiet or args.score_only)
    except (ValueError, FileNotFoundError) as exc:
        raise RelexError(str(exc)) from exc
    print_scores(scores, args, "pass@1")
    if args.json:
        doc = {"dataset": str(args.dataset), "items": len(items), "backend": args.backend, "grader": "math-verify",
               "max_new_tokens": args.max_new_tokens, "scores": {str(m): s.as_dict() for m, s in scores.items()}}
        from relex.jsonout import write_json

        write_json(args.json, doc)
    return 0


def print_scores(scores: dict, args: argparse.Namespace, metric: str) -> None:
    """One number per line with --score-only, else one aligned line per model (nothing with -q); every model
    after the first also gets its paired difference to the first (same items: e.g. against the cutoff)."""
    if args.score_only:
        for s in scores.values():
            print(f"{s.accuracy:.6f}")
    elif not args.quiet:
        width = max(len(str(m)) for m in scores)
        first = next(iter(scores.values()))
        for i, (model, s) in enumerate(scores.items()):
            paired = "  {:+.4f} ± {:.4f} vs the first, paired".format(*s.minus(first)) if i else ""
            print(f"{str(model):<{width}}  {metric} {s.accuracy:.4f} ± {s.stderr:.4f}  ({s.correct}/{s.total})"
                  f"{paired}")
