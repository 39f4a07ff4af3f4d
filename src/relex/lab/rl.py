"""RLVR with TRL's `GRPOTrainer` on CPU; the task verifier is the reward.

Checkpoints land in TRL's own layout (``run_dir/checkpoint-N/``: fp32 safetensors, config, tokenizer and
trainer state, no optimizer state) every ``save_every`` steps, which is what `relex.Trajectory.discover` reads.
With LoRA (a PEFT ``LoraConfig`` handed to the trainer) a checkpoint holds only the adapter
(``adapter_config.json`` + ``adapter_model.safetensors``), which relex reads as exact merged deltas.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from relex.lab.profiles import LoraSettings, RLConfig
from relex.lab.tasks import Task


class _RewardBar(TrainerCallback):
    """One tqdm bar over GRPO steps showing the mean training reward (replaces the Trainer's log printing)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = tqdm(total=total, desc="grpo", disable=quiet, leave=False)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "reward" in logs:
            self.bar.set_postfix(reward=f"{logs['reward']:.3f}")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.bar.close()


def prompt_dataset(task: Task, n: int, seed: int) -> Dataset:
    """``n`` training prompts (never held-out ones) with their answers as a reward column."""
    problems = task.sample_many(n, random.Random(f"rl:{seed}"))
    return Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})


def lora_config(lora: LoraSettings):
    """PEFT's ``LoraConfig`` for ``lora``: no dropout, no bias, the usual causal-LM task type."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(lora.targets), task_type="CAUSAL_LM")


def grpo_config(cfg: RLConfig, task: Task, out_dir: Path, seed: int, lora: bool = False,
                accelerator: bool = False, grad_accum: int = 1) -> GRPOConfig:
    """A deterministic GRPOConfig saving every ``cfg.save_every`` steps (LoRA: ``cfg.lora_lr``).

    CPU and fp32 by default; ``accelerator``: the GPU with bf16 autocast (fp32 master weights, so checkpoints
    stay fp32), generation by vLLM (colocated) when it is installed. ``grad_accum`` splits each step's
    completions into that many micro-batches (one generation and one optimizer step per step all the same).
    """
    return GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=not accelerator,
        bf16=accelerator,
        use_vllm=accelerator and importlib.util.find_spec("vllm") is not None,
        vllm_mode="colocate",
        fp16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size // grad_accum,
        gradient_accumulation_steps=grad_accum,
        num_generations=cfg.group_size,
        max_completion_length=task.max_new_tokens,
        temperature=cfg.temperature,
        learning_rate=cfg.lora_lr if lora else cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=0,
        weight_decay=0.0,
        beta=cfg.beta,
        max_steps=cfg.steps,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_only_model=True,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


@dataclass
class GRPOResult:
    """What a run leaves besides its checkpoints: TRL's log history and the count of trained parameters."""

    history: list[dict]
    trainable_parameters: int


def run_grpo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, cfg: RLConfig,
             out_dir: Path, seed: int, quiet: bool = False, lora: LoraSettings | None = None,
             accelerator: bool = False, grad_accum: int = 1,
             callbacks: list[TrainerCallback] | None = None) -> GRPOResult:
    """Train ``model`` with GRPO (a fresh LoRA adapter on it if ``lora``), writing ``out_dir/checkpoint-N/``.

    ``accelerator`` and ``grad_accum``: see `grpo_config`; ``callbacks``: more trainer callbacks (e.g.
    ``relex.integrations.trl.RelexCallback``)."""
    dataset = prompt_dataset(task, cfg.steps * cfg.prompts_per_step, seed)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=task.reward,
        args=grpo_config(cfg, task, out_dir, seed, lora=lora is not None, accelerator=accelerator,
                         grad_accum=grad_accum),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_RewardBar(cfg.steps, quiet), *(callbacks or [])],
        peft_config=lora_config(lora) if lora else None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return GRPOResult(trainer.state.log_history, trainable)
