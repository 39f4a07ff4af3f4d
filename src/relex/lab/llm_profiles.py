"""Lab profiles for a real pretrained LLM (`relex lab --model smollm2-135m`): `ci`, `cpu` and `gpu`.

Plain dataclasses only, so that building the `relex` parser does not import torch or TRL. The RL knobs
reuse the tiny lab's `RLConfig` (full fine-tuning, constant lr, KL beta 0.001, G = 8, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relex.lab.profiles import RLConfig


@dataclass(frozen=True)
class LLMProfile:
    """One LLM lab run besides the seed and output folder: model, task sizes, GRPO, evaluation, device."""

    name: str
    model: str
    heldout_size: int
    max_new_tokens: int
    rl: RLConfig
    word_share: float = 0.5  # share of two-step word problems (the rest: arithmetic)
    kinds: str = "+-*"  # the arithmetic kinds drawn (sums, differences, products)
    cutoffs: tuple[float, ...] = (0.15, 0.20)
    curve_every: int = 1
    eval_batch_size: int = 64
    accelerator: bool = False  # GPU run: bf16 autocast, no use_cpu (vLLM generation when installed)
    grad_accum: int = 1  # micro-batches per step (one generation, one optimizer step): bounds activation memory
    budget: str = ""
    notes: list[str] = field(default_factory=list)


LLM_PROFILES: dict[str, LLMProfile] = {
    "ci": LLMProfile(
        name="ci",
        model="smollm2-135m",
        heldout_size=8,
        max_new_tokens=32,
        rl=RLConfig(steps=3, prompts_per_step=1, group_size=8, lr=1e-5, beta=0.001, lora_lr=1e-4),
        word_share=0.0,
        curve_every=3,
        eval_batch_size=8,
        budget="about 5 min on 2 CPU cores, whole pipeline, GGUF conversion (about 70 s, once) excluded",
        notes=["ci tests the pipeline, not the science: 3 steps of 1 prompt x 8 on arithmetic only (short answers, "
               "so that some completions earn a reward within 32 tokens), held-out n=8"],
    ),
    "cpu": LLMProfile(
        name="cpu",
        model="smollm2-135m",
        heldout_size=128,
        max_new_tokens=48,
        rl=RLConfig(steps=24, prompts_per_step=4, group_size=8, lr=2e-5, beta=0.001, temperature=0.7,
                    lora_lr=1e-4),
        word_share=0.0,
        kinds="+*",
        curve_every=8,
        eval_batch_size=64,
        budget="about 60 min on 2 CPU cores",
        notes=["paper: 500 steps, 256 prompts x 8, lr 1e-6, KL 0.001, constant lr; here 24 steps of 4 prompts x 8, "
               "48 new tokens, lr 2e-5 and held-out n=128 so that 2 CPU cores finish in about an hour",
               "sums and products only, sampled at temperature 0.7: at theta_0 (strict grader, 48 tokens, 8 prompts "
               "x 8 of a kind, benchmarks/zero_std_groups.py) sums earn 6% and products 22% at T=0.7, against 2-3% "
               "and 8-9% at T=1; differences earn 0% at either, and all-equal groups (no gradient) fall from 79-88% "
               "to about 50%, so that the 15-20% windows hold gradient steps (the earlier profile, 2 prompts of all "
               "three kinds at T=1, had no gradient in 10-11 of its 24 steps)"],
    ),
    "gpu": LLMProfile(
        name="gpu",
        model="smollm2-135m",
        heldout_size=500,
        max_new_tokens=96,
        rl=RLConfig(steps=100, prompts_per_step=64, group_size=8, lr=3e-6, beta=0.001, save_every=5, lora_lr=3e-5),
        curve_every=10,
        eval_batch_size=500,
        accelerator=True,
        grad_accum=4,
        budget="about 12 min on one H100 (measured: 5-6 s per GRPO step with HF generate, 73 s to score 20 models)",
        notes=["paper: 500 steps, 256 prompts x 8, lr 1e-6, KL 0.001, constant lr; here 100 steps of 64 prompts x 8 "
               "(4 micro-batches of 128 completions), a checkpoint every 5 steps (20 x 540 MB)"],
    ),
}
