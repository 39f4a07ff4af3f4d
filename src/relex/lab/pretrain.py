"""Supervised pre-training of the base model, stopped while its greedy accuracy is in a modest band.

Accuracy on these tasks jumps sharply once the model "gets" the algorithm, so training evaluates at a
fixed cadence and, when an evaluation overshoots the band, rolls back to the previous evaluation and
retries with a finer cadence and a smaller learning rate. Stopping uses a validation set drawn from the
training distribution (disjoint from the held-out set), so the held-out set is never used for selection.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relex.eval.scoring import score_model
from relex.lab.profiles import PretrainConfig
from relex.eval.dataset import Problem
from relex.lab.tasks import Task


@dataclass(frozen=True)
class PretrainResult:
    """Where pre-training stopped and the validation accuracy there."""

    steps: int
    val_accuracy: float
    in_band: bool
    rollbacks: int
    history: list[tuple[int, float]]


def _batch(problems: list[Problem], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos>prompt answer<eos>`` sequences; loss only on the answer and <eos>."""
    full = tokenizer([p.prompt + p.answer for p in problems])["input_ids"]
    prompt_lens = [len(ids) for ids in tokenizer([p.prompt for p in problems])["input_ids"]]
    seqs = [ids + [tokenizer.eos_token_id] for ids in full]
    labels = [[-100] * n + ids[n:] for ids, n in zip(seqs, prompt_lens, strict=True)]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}


def pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, cfg: PretrainConfig,
             seed: int, quiet: bool = False) -> PretrainResult:
    """Train ``model`` in place until validation greedy accuracy lands in ``cfg.band``."""
    rng = random.Random(f"pretrain:{seed}")
    val = task.sample_many(cfg.val_size, random.Random(f"val:{seed}"))
    lo, hi = cfg.band
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    every, rollbacks, step = cfg.eval_every, 0, 0
    history: list[tuple[int, float]] = []
    snapshot = (0, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    acc = 0.0
    bar = tqdm(total=cfg.max_steps, desc="pretrain", disable=quiet, leave=False)
    while step < cfg.max_steps:
        model.train()
        for _ in range(every):
            loss = model(**_batch(task.sample_many(cfg.batch_size, rng), tokenizer)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
        bar.update(every)
        model.eval()
        acc = score_model(model, tokenizer, task, problems=val).accuracy
        history.append((step, acc))
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
        if lo <= acc <= hi or (acc > hi and rollbacks >= cfg.max_rollbacks):
            break
        if acc > hi:
            # Overshot the band: go back to the last evaluation, evaluate 4x more often, step half as far.
            step, model_state, opt_state = snapshot
            model.load_state_dict(model_state)
            opt.load_state_dict(opt_state)
            for group in opt.param_groups:
                group["lr"] *= 0.5
            sched.base_lrs = [b * 0.5 for b in sched.base_lrs]
            every, rollbacks = max(1, every // 4), rollbacks + 1
            bar.n = step
            continue
        snapshot = (step, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    bar.close()
    model.eval()
    return PretrainResult(step, acc, lo <= acc <= hi, rollbacks, history)
