"""Logits extrapolation (Wang et al., 2026): decode two models in lockstep, each with its KV cache.

Every token is drawn from l_0 + alpha * (l_cut - l_0), where l_0 are the anchor model's next-token
logits (the base or an early checkpoint) and l_cut the cutoff checkpoint's; alpha = (T - t_0) / (t_cut - t_0)
aims at step T. Temperature and top-p apply to the combined logits; temperature 0 is greedy.
Weights are never changed. Batches are left-padded, with positions taken from the attention mask.
"""

from __future__ import annotations

import torch


def extrapolation_alpha(target: int, anchor_step: int, cutoff_step: int) -> float:
    """alpha that extrapolates the anchor -> cutoff line to ``target`` (real step numbers)."""
    if cutoff_step <= anchor_step:
        raise ValueError(f"cutoff step {cutoff_step} must be after the anchor step {anchor_step}")
    return (target - anchor_step) / (cutoff_step - anchor_step)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask all but the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p
    sorted_logits[drop] = float("-inf")
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def generate_extrapolated(anchor_model, cutoff_model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          alpha: float, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
                          temperature: float = 0.0, top_p: float = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """New tokens (batch x <= max_new_tokens), pad after each row's end of sequence."""
    mask = attention_mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [None, None]
    step_ids = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    produced = []
    for _ in range(max_new_tokens):
        logits = []
        for i, model in enumerate((anchor_model, cutoff_model)):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=caches[i], use_cache=True)
            caches[i] = out.past_key_values
            logits.append(out.logits[:, -1].float())
        combined = logits[0] + alpha * (logits[1] - logits[0])
        if temperature > 0:
            combined = _top_p(combined / temperature, top_p) if top_p < 1 else combined / temperature
            token = torch.multinomial(combined.softmax(-1), 1, generator=generator).squeeze(-1)
        else:
            token = combined.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        produced.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if finished.all():
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
        positions = positions[:, -1:] + 1
    return torch.stack(produced, dim=1) if produced else input_ids[:, :0]
