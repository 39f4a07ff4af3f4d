"""RelexCallback inside a real TRL GRPO run on the tiny lab model: predictions, logged diagnostics, jump_to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from conftest import max_relative_error, numpy_relex, predicted_deltas  # noqa: E402
from relex.integrations.trl import RelexCallback  # noqa: E402
from relex.lab.model import build_model  # noqa: E402
from relex.lab.profiles import PROFILES, RLConfig  # noqa: E402
from relex.lab.rl import grpo_config, prompt_dataset  # noqa: E402
from relex.lab.tasks import make_task  # noqa: E402
from relex.lab.tokenizer import build_tokenizer  # noqa: E402


def ones_reward(completions, **kwargs) -> list[float]:
    """A reward an untrained model's samples differ in (the task's verifier gives them all 0: no gradient)."""
    return [c.count("1") / max(len(c), 1) for c in completions]


class Probe(TrainerCallback):
    """Records the weights and optimizer state right after each save (it runs after RelexCallback)."""

    def __init__(self) -> None:
        self.after_save: dict[int, tuple[dict[str, torch.Tensor], int]] = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.after_save[state.global_step] = (weights, len(optimizer.state))


def train(out: Path, steps: int, callback: RelexCallback) -> tuple[GRPOTrainer, Probe]:
    profile = PROFILES["ci"]
    task = make_task(profile.task, profile.digits, heldout_size=50)
    tokenizer = build_tokenizer(task.alphabet)
    model = build_model(profile.shape, tokenizer, seed=0)
    cfg = RLConfig(steps=steps, prompts_per_step=4, group_size=4, lr=3e-3)
    probe = Probe()
    trainer = GRPOTrainer(model=model, reward_funcs=ones_reward, args=grpo_config(cfg, task, out / "run", seed=0),
                          train_dataset=prompt_dataset(task, steps * cfg.prompts_per_step, 0),
                          processing_class=tokenizer, callbacks=[callback, probe])
    torch.set_num_threads(1)
    trainer.train()
    return trainer, probe


def test_callback_writes_predictions_and_logs_diagnostics(tmp_path: Path) -> None:
    callback = RelexCallback(targets=[20], every=2, cache=False)
    trainer, _ = train(tmp_path, steps=6, callback=callback)
    out = tmp_path / "run" / "relex"
    meta = json.loads((out / "step-20" / "relex.json").read_text())
    assert meta["observed_steps"] == [1, 2, 3, 4, 5, 6] and meta["watch"]["step"] == 6

    base = out / "base"
    w0 = load_file(str(base / "model.safetensors"))
    ckpts = {s: load_file(str(tmp_path / "run" / f"checkpoint-{s}" / "model.safetensors")) for s in range(1, 7)}
    assert any(not torch.equal(ckpts[6][n], w0[n]) for n in w0)  # training moved the weights
    reference = numpy_relex(w0, ckpts, list(range(1, 7)), 20)
    assert max_relative_error(predicted_deltas(out / "step-20", base), reference) < 1e-5

    logged = [row for row in trainer.state.log_history if "relex/rank1_share" in row]
    assert [row["step"] for row in logged] == [2, 3, 4, 5, 6]  # one status per save from the second on
    assert logged[-1]["relex/checkpoints"] == 6 and 0 < logged[-1]["relex/rank1_share"] <= 1
    assert "relex/safe_horizon" in logged[-1]  # six checkpoints: the backtest ran
    assert 0 <= logged[-1]["relex/idle_steps"] <= 6
    assert callback.history[-1]["relex/window"] == 6


@pytest.mark.parametrize("optimizer", ["keep", "reset"])
def test_jump_to_loads_the_prediction_and_moves_the_step(tmp_path: Path, optimizer: str) -> None:
    callback = RelexCallback(jump_at=3, jump_to=6, optimizer=optimizer, cache=False)
    trainer, probe = train(tmp_path, steps=8, callback=callback)
    assert callback.jumped is not None and callback.jumped["from"] == 3 and callback.jumped["to"] == 6
    assert trainer.state.global_step == 8  # steps 4..6 skipped: two real steps after the jump
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == [1, 2, 3, 7, 8]
    predicted = load_file(str(tmp_path / "run" / "relex" / "step-6" / "model.safetensors"))
    weights, optimizer_states = probe.after_save[6]  # the probe's view of save 3, after the jump
    for name, value in predicted.items():
        assert torch.equal(weights[name], value), name
    assert (optimizer_states == 0) == (optimizer == "reset")
    before = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    assert max(float((predicted[n] - before[n]).abs().max()) for n in predicted) > 0
    jumps = [row for row in trainer.state.log_history if "relex/jumped_to" in row]
    assert len(jumps) == 1 and jumps[0]["relex/jumped_from"] == 3
    assert np.isfinite([row.get("loss", 0.0) for row in trainer.state.log_history]).all()


def test_callback_refuses_to_guess_the_base(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from relex.errors import RelexError

    args = SimpleNamespace(output_dir=str(tmp_path / "run"), world_size=1)
    model = build_model(PROFILES["ci"].shape, build_tokenizer(make_task("addition", 2, 50).alphabet), seed=0)
    resumed = SimpleNamespace(is_world_process_zero=True, global_step=5)
    with pytest.raises(RelexError, match="resumed at step 5"):
        RelexCallback().on_train_begin(args, resumed, None, model=model)
    model.peft_config = {}  # what a PEFT model carries
    with pytest.raises(RelexError, match="PEFT"):
        RelexCallback().on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None,
                                       model=model)
    with pytest.raises(RelexError, match="jump_at=5 needs a jump_to beyond it"):
        RelexCallback(jump_at=5, jump_to=4)
    with pytest.raises(RelexError, match="choose one of keep, reset"):
        RelexCallback(optimizer="adam")
