"""Greedy, batched pass@1 of a model on graded problems: loading a model folder, decoding, and the Score.

A PEFT LoRA adapter folder is scored as its base with the adapter merged in
(``PeftModel.from_pretrained(base).merge_and_unload()``): the model it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from relex.analysis.metrics import mean_stderr
from relex.eval.dataset import Problem
from relex.trajectory.peft import is_adapter_folder


class GradedTask(Protocol):
    """What scoring needs of a task: its problems (prompts already rendered), a token budget and a grader."""

    heldout: list[Problem]
    max_new_tokens: int

    def verify(self, completion: str, answer: str) -> bool: ...


@dataclass(frozen=True)
class Score:
    """Which held-out problems a model answered right, in order: accuracy with its binomial standard error,
    and the paired difference to another model scored on the same problems."""

    outcomes: tuple[bool, ...]

    @property
    def correct(self) -> int:
        return sum(self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.total)

    def minus(self, other: "Score") -> tuple[float, float]:
        """(mean, standard error) of the per-problem difference self - other: the paired comparison, tighter
        than two unpaired standard errors when the models agree on most problems."""
        if other.total != self.total:
            raise ValueError(f"paired scores need the same problems: {self.total} vs {other.total}")
        return mean_stderr([int(a) - int(b) for a, b in zip(self.outcomes, other.outcomes)])

    @property
    def outcome_string(self) -> str:
        """``"0110..."``: right (1) or wrong (0) per problem, as report and JSON files keep it for later pairing."""
        return "".join("1" if o else "0" for o in self.outcomes)

    def as_dict(self) -> dict[str, float | int | str]:
        return {"correct": self.correct, "total": self.total, "accuracy": self.accuracy, "stderr": self.stderr,
                "outcomes": self.outcome_string}


def tokenizer_folder(model_dir: Path, fallback: Path | None = None) -> Path:
    """The folder whose tokenizer scores ``model_dir``: its own, else ``fallback``'s (relex outputs may carry none)."""
    for source in (model_dir, fallback):
        if source is not None and (Path(source) / "tokenizer_config.json").exists():
            return Path(source)
    raise FileNotFoundError(f"no tokenizer in {model_dir}" + (f" or {fallback}" if fallback else "") +
                            "; pass --tokenizer DIR")


def load_tokenizer(model_dir: Path, fallback: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``tokenizer_folder(model_dir, fallback)``, padding on the left for batched decoding."""
    tok = AutoTokenizer.from_pretrained(tokenizer_folder(model_dir, fallback))
    tok.padding_side = "left"
    return tok


def load_model(model_dir: Path, adapter_base: Path | None = None) -> PreTrainedModel:
    """fp32 model in eval mode, loaded strictly offline; eager attention decodes small batches fastest on CPU.

    An adapter folder is merged onto ``adapter_base`` (required then): the result is a plain model.
    """
    if is_adapter_folder(model_dir):
        if adapter_base is None:
            raise ValueError(f"{model_dir} is a LoRA adapter checkpoint: give its base model (--base DIR)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(adapter_base), model_dir).merge_and_unload()
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True,
                                                 attn_implementation="eager")
    return model.eval()


@torch.inference_mode()
def greedy_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
                       max_new_tokens: int, batch_size: int = 512) -> list[str]:
    """The model's greedy completion of each problem's prompt, decoded in batches."""
    texts: list[str] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        enc = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def score_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: GradedTask,
                batch_size: int = 512, problems: list[Problem] | None = None) -> Score:
    """Greedy-decode every held-out prompt (or the given ``problems``) and count verified answers."""
    problems = task.heldout if problems is None else problems
    texts = greedy_completions(model, tokenizer, problems, task.max_new_tokens, batch_size)
    return Score(tuple(task.verify(t, p.answer) for t, p in zip(texts, problems, strict=True)))
