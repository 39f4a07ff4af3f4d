"""The lab on a real pretrained LLM: theta_0 = SmolLM2-135M-Instruct, GRPO on chat-templated math, extrapolate, evaluate.

Same phases and outputs as the tiny lab (`relex.lab.lab`), with conversion of the GGUF (cached) in place of
pre-training::

    base/                                  theta_0 (hard links to the cached conversion when possible)
    run/checkpoint-N/                      every GRPO checkpoint, TRL's layout (LoRA: the adapter only)
    extrapolated/<method>-cut<C>/step-T/   relex outputs for each method and cutoff
    heldout.jsonl                          the held-out set (`relex eval MODEL --dataset heldout.jsonl` re-scores it)
    verify.jsonl                           400 problems drawn like training ones, for `relex extrapolate --verify`
    report.json  report.md  accuracy.png
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from relex.errors import RelexError
from relex.lab import report
from relex.lab.lab import (LAB_LAYOUT, _Clock, check_lab_out, cutoff_steps, extrapolate_and_measure, lab_methods,
                           lab_targets, point_adapters_at, quiet_libraries, write_verify_set)
from relex.lab.llm_profiles import LLMProfile
from relex.lab.profiles import LoraSettings
from relex.tempfiles import building

if TYPE_CHECKING:
    from relex.lab.tasks import Task


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (the base is never written to), copying where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _model_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights (what each full checkpoint and each extrapolation writes again)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def check_disk(out: Path, profile: LLMProfile, model_bytes: int, lora: bool) -> None:
    """Refuse before GRPO when the disk under ``out`` cannot hold the run: full checkpoints (none for LoRA,
    whose adapters are small) plus the lab's extrapolations from each cutoff to each target, with 10% to spare."""
    last = profile.rl.steps
    checkpoints = 0 if lora else -(-last // profile.rl.save_every)
    extrapolations = sum(len(lab_methods(c)) * len(lab_targets(last)) for c in cutoff_steps(profile.cutoffs, last))
    needed = int(1.1 * model_bytes * (checkpoints + extrapolations))
    where = next(p for p in (Path(out).absolute(), *Path(out).absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < needed:
        raise RelexError(f"{out}: the lab writes about {needed / 1e9:.1f} GB ({checkpoints} checkpoints and "
                         f"{extrapolations} extrapolations of {model_bytes / 1e6:.0f} MB) but {where} has "
                         f"{free / 1e9:.1f} GB free; free some or choose another --out")


def run_llm_lab(profile: LLMProfile, out: Path, seed: int = 0, overwrite: bool = False, quiet: bool = False,
                lora: LoraSettings | None = None, threads: int = 1) -> Path:
    """Run every phase of ``profile`` into ``out``; returns ``out``. Refuses an existing ``out`` unless told."""
    return _run(profile, Path(out), seed, overwrite, quiet, lora, threads, evaluate=True)


def train_llm_run(profile: LLMProfile, out: Path, seed: int = 0, overwrite: bool = False, quiet: bool = False,
                  lora: LoraSettings | None = None, threads: int = 1) -> Path:
    """The lab's run without its extrapolations and evaluation: ``base/``, ``run/``, ``heldout.jsonl`` and
    ``verify.jsonl``, for those that score it their own way (benchmarks/verify_calibration.py)."""
    return _run(profile, Path(out), seed, overwrite, quiet, lora, threads, evaluate=False)


def _run(profile: LLMProfile, out: Path, seed: int, overwrite: bool, quiet: bool, lora: LoraSettings | None,
         threads: int, evaluate: bool) -> Path:
    check_lab_out(out, overwrite)
    quiet_libraries(quiet)  # before transformers is imported, so that its offline switches take effect
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from relex.eval.dataset import write_dataset
    from relex.lab.math_task import MathTask, chat_renderer
    from relex.lab.model import count_parameters
    from relex.lab.pretrained import MODELS, ensure_model
    from relex.lab.rl import run_grpo

    if profile.accelerator and not torch.cuda.is_available():
        raise RelexError(f"profile {profile.name!r} needs a CUDA GPU; use --profile cpu on this machine")
    torch.set_num_threads(threads)
    device = "cuda" if profile.accelerator else "cpu"
    clock = _Clock()
    with clock.phase("convert"):
        theta0 = ensure_model(profile.model, quiet)
    check_disk(out, profile, _model_bytes(theta0), lora is not None)
    with building(out, overwrite=overwrite, layout=LAB_LAYOUT, what="relex lab") as tmp:
        base_dir, run_dir = tmp / "base", tmp / "run"
        shutil.copytree(theta0, base_dir, copy_function=_link_or_copy)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        task = MathTask(chat_renderer(tokenizer), profile.heldout_size, max_new_tokens=profile.max_new_tokens,
                        word_share=profile.word_share, kinds=profile.kinds)
        write_dataset(tmp / "heldout.jsonl", task.dataset(task.heldout))
        write_verify_set(tmp / "verify.jsonl", task, seed)
        with clock.phase("rl"):
            set_seed(seed)
            policy = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            parameters = count_parameters(policy)
            grpo = run_grpo(policy, tokenizer, task, profile.rl, run_dir, seed, quiet, lora=lora,
                            accelerator=profile.accelerator, grad_accum=profile.grad_accum)
            del policy
            if lora is not None:
                point_adapters_at(run_dir, out / "base")
        if not evaluate:
            return out
        last = profile.rl.steps
        cutoffs, curve, rows, moves = extrapolate_and_measure(tmp, task, last, profile.cutoffs, profile.curve_every,
                                                              clock, quiet, profile.eval_batch_size, device)
        meta = {
            "profile": profile.name, "seed": seed, "threads": threads, "T": last, "cutoffs": cutoffs,
            "task": task.spec(),
            "model": {"name": profile.model, "source": MODELS[profile.model].gguf, "parameters": parameters},
            "pretrain": {"from": str(theta0)},
            "rl": {**asdict(profile.rl), "lr_used": profile.rl.lora_lr if lora else profile.rl.lr,
                   "max_completion_length": profile.max_new_tokens, "accelerator": profile.accelerator,
                   "grad_accum": profile.grad_accum},
            "lora": None if lora is None else {**asdict(lora), "trainable_parameters": grpo.trainable_parameters},
            "train_reward": [{"step": h["step"], "reward": h["reward"]} for h in grpo.history if "reward" in h],
            "train_log": [h for h in grpo.history if "reward" in h],
            "drift": moves, "seconds": clock.seconds, "budget": profile.budget, "notes": profile.notes,
        }
        meta["seconds"]["total"] = round(sum(clock.seconds.values()), 2)
        report.write(tmp, meta, rows, curve)
    return out


def lab_task(lab_dir: Path) -> Task:
    """The task (held-out set included) of a finished lab folder, tiny or LLM, rebuilt from its report.json."""
    from relex.lab.tasks import make_task

    path = Path(lab_dir) / "report.json"
    if not path.is_file():
        raise RelexError(f"{lab_dir}: not a lab output folder (no report.json)")
    spec = json.loads(path.read_text())["task"]
    if spec["task"] != "math":
        return make_task(spec["task"], spec["digits"], spec["heldout_size"], spec["heldout_seed"])
    from transformers import AutoTokenizer

    from relex.lab.math_task import ARITHMETIC_KINDS, MathTask, chat_renderer

    tokenizer = AutoTokenizer.from_pretrained(Path(lab_dir) / "base")
    return MathTask(chat_renderer(tokenizer), spec["heldout_size"], spec["heldout_seed"], spec["max_new_tokens"],
                    spec["word_share"], spec.get("kinds", ARITHMETIC_KINDS))
