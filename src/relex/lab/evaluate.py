"""The lab's held-out accuracy of model folders (real checkpoints or relex outputs), and of logits
extrapolation; scoring itself is ``relex.eval.scoring``'s."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relex.eval.scoring import Score, load_model, load_tokenizer, score_model
from relex.lab.tasks import Task


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
