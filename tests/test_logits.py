"""Logits extrapolation: two pico models decoded in lockstep with KV caches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_pico_model
from relex.inference import extrapolation_alpha, generate_extrapolated


@pytest.fixture
def two_models(tmp_path):
    a = save_pico_model(tmp_path / "a", seed=0)
    c = save_pico_model(tmp_path / "c", seed=1)
    tok = AutoTokenizer.from_pretrained(a)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(a).eval(), AutoModelForCausalLM.from_pretrained(c).eval(), tok


def greedy(model, batch, tok, n):
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("alpha, which", [(0.0, 0), (1.0, 1)])
def test_alpha_0_and_1_decode_like_each_model_alone(two_models, alpha, which):
    a, c, tok = two_models
    batch = tok(["12+3=", "7+45=", "1+1="], return_tensors="pt", padding=True)
    ours = generate_extrapolated(a, c, batch["input_ids"], batch["attention_mask"], alpha, 8,
                                 tok.eos_token_id, tok.pad_token_id)
    ref = greedy((a, c)[which], batch, tok, 8)
    assert torch.equal(ours, ref[:, : ours.shape[1]])


def test_combined_logits_step_matches_a_full_forward(two_models):
    """With caches, each step's combination equals l_0 + alpha (l_cut - l_0) of a full re-run."""
    a, c, tok = two_models
    batch = tok(["12+3=", "9+9="], return_tensors="pt", padding=True)
    new = generate_extrapolated(a, c, batch["input_ids"], batch["attention_mask"], 2.5, 4, None, tok.pad_token_id)
    ids = torch.cat([batch["input_ids"], new[:, :3]], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new[:, :3])], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    la = a(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    lc = c(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    assert torch.equal((la + 2.5 * (lc - la)).argmax(-1), new[:, 3])


def test_sampling_is_reproducible_and_alpha_from_steps(two_models):
    a, c, tok = two_models
    batch = tok(["3+4="], return_tensors="pt")
    run = [generate_extrapolated(a, c, batch["input_ids"], batch["attention_mask"], 1.5, 6, None, tok.pad_token_id,
                                 temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))
           for _ in range(2)]
    assert torch.equal(run[0], run[1])
    assert extrapolation_alpha(300, 0, 60) == 5.0 and extrapolation_alpha(120, 20, 60) == 2.5
    with pytest.raises(ValueError):
        extrapolation_alpha(10, 5, 5)
