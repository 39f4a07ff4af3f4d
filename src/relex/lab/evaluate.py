"""Greedy, batched held-out accuracy of model folders (real checkpoints or relex outputs).

A PEFT LoRA adapter checkpoint (a LoRA lab run's ``checkpoint-N/``) is scored as its base with the
adapter merged in (``PeftModel.from_pretrained(base).merge_and_unload()``): the model it stands for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from relex.analysis.metrics import mean_stderr
from relex.lab.tasks import Problem, Task
from relex.trajectory.peft import is_adapter_folder

if TYPE_CHECKING:
    from relex.lab.dataset_eval import FileTask


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


def load_tokenizer(model_dir: Path, fallback: Path | None = None) -> PreTrainedTokenizerBase:
    """The folder's own tokenizer, else the one in ``fallback`` (relex outputs may carry none)."""
    for source in (model_dir, fallback):
        if source is not None and (Path(source) / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(source)
            tok.padding_side = "left"
            return tok
    raise FileNotFoundError(f"no tokenizer in {model_dir}" + (f" or {fallback}" if fallback else "") +
                            "; pass --tokenizer DIR")


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


def score_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task | FileTask,
                batch_size: int = 512, problems: list[Problem] | None = None) -> Score:
    """Greedy-decode every held-out prompt (or the given ``problems``) and count verified answers."""
    problems = task.heldout if problems is None else problems
    texts = greedy_completions(model, tokenizer, problems, task.max_new_tokens, batch_size)
    return Score(tuple(task.verify(t, p.answer) for t, p in zip(texts, problems, strict=True)))


@torch.inference_mode()
def score_logits_extrapolation(anchor: PreTrainedModel, cutoff: PreTrainedModel, alpha: float,
                               tokenizer: PreTrainedTokenizerBase, task: Task, batch_size: int = 512) -> Score:
    """Greedy held-out accuracy of decoding from l_anchor + alpha (l_cut - l_anchor), both with KV caches."""
    from relex.inference import generate_extrapolated

    outcomes: list[bool] = []
    for start in range(0, len(task.heldout), batch_size):
        batch = task.heldout[start:start + batch_size]
        enc = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True).to(anchor.device)
        new = generate_extrapolated(anchor, cutoff, enc["input_ids"], enc["attention_mask"], alpha,
                                    task.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        outcomes += [task.verify(t, p.answer) for t, p in zip(texts, batch, strict=True)]
    return Score(tuple(outcomes))


def score_dirs(model_dirs: list[Path], task: Task, tokenizer_dir: Path | None = None, batch_size: int = 512,
               quiet: bool = False, desc: str = "eval", adapter_base: Path | None = None,
               device: str = "cpu") -> dict[Path, Score]:
    """Score each folder on the task's held-out set (progress bar unless ``quiet``); adapters merge onto ``adapter_base``.

    ``device``: where the models run (``cuda`` for a GPU lab run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    scores: dict[Path, Score] = {}
    for d in tqdm(model_dirs, desc=desc, disable=quiet, leave=False):
        d = Path(d)
        scores[d] = score_model(load_model(d, adapter_base).to(device), load_tokenizer(d, tokenizer_dir), task,
                                batch_size)
    return scores
