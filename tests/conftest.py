"""Fixtures: pico Hugging Face models saved with save_pretrained, and fake training runs on disk.

A fake run moves every tensor along a known rank-1 linear drift plus noise, at irregular steps, and
saves each checkpoint in a real layout (TRL, verl, OpenRLHF, plain) as real safetensors files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STEPS = [2, 3, 5, 8, 13, 21]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>"] + list("0123456789+= abc"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def save_pico_model(folder: Path, arch: str = "qwen2", dtype: torch.dtype = torch.float32,
                    tie: bool = False, seed: int = 0) -> Path:
    """A pico causal LM (2 layers, hidden 16) saved with save_pretrained, tokenizer included."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = cfg_cls(vocab_size=18, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=tie)
    model = model_cls(config).to(dtype)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def state_dict_module(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose parameters are copies of ``tensors`` under their dotted names (an HF model's state dict),
    for the torch APIs that shard a module as trainers do (FSDP2 ``fully_shard``)."""
    root = torch.nn.Module()
    for name, value in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    return root


def drift_run(base: Path, run: Path, steps=STEPS, layout: str = "trl", noise: float = 0.01, seed: int = 1,
              dtype: torch.dtype | None = None, slope: float = 0.05,
              offset: float = 0.1) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints W_t = W_0 + (slope*t + offset) * V + noise*eps_t per tensor; returns them by step."""
    gen = torch.Generator().manual_seed(seed)
    w0 = load_file(str(base / "model.safetensors"))
    directions = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in w0.items()}
    out = {}
    for step in steps:
        tensors = {}
        for name, t in w0.items():
            noise_t = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            value = t.double() + (slope * step + offset) * directions[name] + noise * noise_t
            tensors[name] = value.to(dtype or t.dtype).contiguous()
        folder = {"trl": run / f"checkpoint-{step}", "verl": run / f"global_step_{step}" / "actor" / "huggingface",
                  "openrlhf": run / f"global_step{step}_hf", "plain": run / f"step_{step}"}[layout]
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", folder / "config.json")
        if layout == "trl":  # what TRL leaves beside the weights: state and a pickle of the arguments
            (folder / "trainer_state.json").write_text("{}")
            (folder / "training_args.bin").write_bytes(b"\x80\x04not-loaded")
        out[step] = tensors
    return out


def rank1_run(base, run, steps=STEPS, slope=0.05, offset=0.1, seed=3):
    """W_t = W_0 + f(t) u v^T for every 2-D tensor (fixed u, v), W_0 + f(t) d for the others; f linear."""
    gen = torch.Generator().manual_seed(seed)
    w0 = load_file(str(base / "model.safetensors"))
    directions = {}
    for name, t in w0.items():
        if t.dim() == 2:
            u = torch.randn(t.shape[0], generator=gen, dtype=torch.float64)
            v = torch.randn(t.shape[1], generator=gen, dtype=torch.float64)
            directions[name] = torch.outer(u, v)
        else:
            directions[name] = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    saved = {}
    for step in steps:
        f = slope * step + offset
        tensors = {n: (t.double() + f * directions[n]).to(t.dtype).contiguous() for n, t in w0.items()}
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        saved[step] = tensors
    return w0, directions, saved, (lambda step: slope * step + offset)


def predicted_deltas(folder: Path, base: Path) -> dict[str, np.ndarray]:
    """W_pred - W_0 per tensor of an output folder, float64."""
    from relex.trajectory import CheckpointReader

    w0 = load_file(str(base / "model.safetensors"))
    reader = CheckpointReader(folder)
    return {n: (reader.read(n).double() - w0[n].double()).numpy() for n in reader.specs}


def relative_error(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(pred - ref) / max(np.linalg.norm(ref), 1e-30))


def max_relative_error(pred: dict, ref: dict) -> float:
    return max(relative_error(pred[n], ref[n]) for n in ref)


@pytest.fixture
def pico(tmp_path: Path):
    """(base folder, run folder, {step: tensors}) for a Qwen2 pico model and a TRL-layout drift run."""
    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    ckpts = drift_run(base, run)
    return base, run, ckpts


def numpy_relex(w0: dict, ckpts: dict, steps: list[int], target: float, rank: int = 1) -> dict[str, np.ndarray]:
    """Reference RELEX in float64 numpy with a full SVD: predicted deltas per tensor."""
    out = {}
    t = np.array(steps, dtype=np.float64)
    for name, base in w0.items():
        m = np.stack([(ckpts[s][name].double() - base.double()).numpy().ravel() for s in steps])
        if not m.any():
            out[name] = np.zeros(base.shape)
            continue
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        delta = np.zeros(m.shape[1])
        for k in range(rank):
            c = u[:, k] * s[k]
            a, b = np.polyfit(t, c, 1)
            delta += (a * target + b) * vt[k]
        out[name] = delta.reshape(base.shape)
    return out
