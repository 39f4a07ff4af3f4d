"""Named lab configurations: `ci` (the test), `default` (the demo, minutes), `long` and `paper` (longer runs).

Plain dataclasses only, so that building the `relex` parser does not import torch or TRL.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """Architecture knobs of the lab model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 64


@dataclass(frozen=True)
class PretrainConfig:
    """Knobs of supervised pre-training and of the stopping band."""

    lr: float
    batch_size: int = 128
    max_steps: int = 4000
    eval_every: int = 25
    band: tuple[float, float] = (0.20, 0.45)
    val_size: int = 300
    warmup_steps: int = 20
    max_rollbacks: int = 6


@dataclass(frozen=True)
class RLConfig:
    """GRPO knobs (names follow the paper: prompts x group size per step, lr, KL beta)."""

    steps: int
    prompts_per_step: int
    group_size: int = 8
    lr: float = 1e-5
    beta: float = 0.0
    scheduler: str = "constant"
    temperature: float = 1.0
    save_every: int = 1
    lora_lr: float = 1e-4  # learning rate of `relex lab --lora` runs (LoRA needs ~10x the full fine-tuning lr)


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA run: rank and alpha of one adapter on every linear projection of the attention and MLP blocks."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Profile:
    """Everything one lab run needs besides the seed and output folder."""

    name: str
    task: str
    digits: int
    heldout_size: int
    shape: ModelShape
    pretrain: PretrainConfig
    rl: RLConfig
    cutoffs: tuple[float, ...] = (0.15, 0.20)
    curve_every: int = 1
    budget: str = ""
    notes: list[str] = field(default_factory=list)


# `default`, `long` and `paper` share one model and its pre-training: they differ only in the RL run.
LAB_MODEL = ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384)
LAB_PRETRAIN = PretrainConfig(lr=3e-3, batch_size=128, max_steps=3000, eval_every=25, band=(0.30, 0.45))

PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        task="addition",
        digits=2,
        heldout_size=3000,
        shape=ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
        pretrain=PretrainConfig(lr=6e-3, batch_size=128, max_steps=2000, eval_every=50, band=(0.30, 0.45)),
        rl=RLConfig(steps=90, prompts_per_step=32, lr=2e-4, lora_lr=2e-3),
        curve_every=5,
        budget="about 90 s on 2 idle CPU cores, whole lab",
        notes=["sized so that GRPO's held-out gain in the first third is several standard errors on every CPU "
               "kernel set, thread count and seed measured (benchmarks/lab_spread.py): 60 steps of 8 prompts "
               "and n=1000 gained -0.5 to 6.0 standard errors across them",
               "--lora: lr 2e-3, 10x the full fine-tuning lr (the usual rule of thumb for LoRA)"],
    ),
    "default": Profile(
        name="default",
        task="addition",
        digits=3,
        heldout_size=1000,
        shape=LAB_MODEL,
        pretrain=LAB_PRETRAIN,
        rl=RLConfig(steps=90, prompts_per_step=32, lr=1e-5, lora_lr=1e-4),
        curve_every=5,
        budget="under 5 min on 2 CPU cores with one of them busy, pre-training included",
        notes=["--lora: lr 1e-4, 10x the full fine-tuning lr (the usual rule of thumb for LoRA)"],
    ),
    "long": Profile(
        name="long",
        task="addition",
        digits=3,
        heldout_size=1000,
        shape=LAB_MODEL,
        pretrain=LAB_PRETRAIN,
        rl=RLConfig(steps=300, prompts_per_step=32, lr=1e-5, lora_lr=1e-4),
        curve_every=10,
        budget="about 6-9 min on 2 CPU cores, pre-training included",
        notes=["the `default` profile before it was cut to 90 steps for the demo",
               "--lora: lr 1e-4, 10x the full fine-tuning lr (the usual rule of thumb for LoRA)"],
    ),
    "paper": Profile(
        name="paper",
        task="addition",
        digits=3,
        heldout_size=2000,
        shape=LAB_MODEL,
        pretrain=LAB_PRETRAIN,
        rl=RLConfig(steps=500, prompts_per_step=128, lr=3e-6, beta=0.001, scheduler="constant", lora_lr=3e-5),
        curve_every=25,
        budget="about 20-30 min on 2 CPU cores",
        notes=["paper: 500 steps, mini-batch 256 prompts, G=8, lr 1e-6, KL 0.001, constant lr; "
               "here 128 prompts x 8 and lr 3e-6 so a CPU finishes and the tiny model still moves",
               "--lora: lr 3e-5, 10x the full fine-tuning lr (the usual rule of thumb for LoRA)"],
    ),
}
