"""Greedy, batched held-out accuracy of model folders (real checkpoints or relex outputs).

A PEFT LoRA adapter checkpoint (a LoRA lab run's ``checkpoint-N/``) is scored as its base with the
adapter merged in (``PeftModel.from_pretrained(base).merge_and_unload()``): the model it stands for.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from relex.lab.tasks import Problem, Task
from relex.trajectory.peft import is_adapter_folder

if TYPE_CHECKING:
    from relex.lab.dataset_eval import FileTask


@dataclass(frozen=True)
class Score:
    """Accuracy on a held-out set with its binomial standard error sqrt(p(1-p)/n)."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.total)

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "accuracy": self.accuracy, "stderr": self.stderr}


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
    return Score(sum(task.verify(t, p.answer) for t, p in zip(texts, problems, strict=True)), len(problems))


@torch.inference_mode()
def score_logits_extrapolation(anchor: PreTrainedModel, cutoff: PreTrainedModel, alpha: float,
                               tokenizer: PreTrainedTokenizerBase, task: Task, batch_size: int = 512) -> Score:
    """Greedy held-out accuracy of decoding from l_anchor + alpha (l_cut - l_anchor), both with KV caches."""
    from relex.inference import generate_extrapolated

    correct = 0
    for start in range(0, len(task.heldout), batch_size):
        batch = task.heldout[start:start + batch_size]
        enc = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True).to(anchor.device)
        new = generate_extrapolated(anchor, cutoff, enc["input_ids"], enc["attention_mask"], alpha,
                                    task.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        correct += sum(task.verify(t, p.answer) for t, p in zip(texts, batch, strict=True))
    return Score(correct, len(task.heldout))


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
