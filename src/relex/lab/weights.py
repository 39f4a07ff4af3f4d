"""Relative weight error of a predicted checkpoint against the real one, read from safetensors files.

A PEFT LoRA adapter checkpoint stands for base + merged delta: relex's ``AdapterReader`` gives that
delta exactly (B @ A * scale in float64), so adapter runs are measured like full ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from relex.trajectory import AdapterReader, CheckpointReader
from relex.trajectory.peft import is_adapter_folder


def _tensors(model_dir: Path, base_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (small) model folder in float64; an adapter folder gives base + its merged delta."""
    model_dir = Path(model_dir)
    if is_adapter_folder(model_dir):
        base = CheckpointReader(Path(base_dir))
        try:
            adapter = AdapterReader(model_dir, base)
            return {name: adapter.read(name) for name in base.specs}
        finally:
            base.close()
    out: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key).to(torch.float64)
    return out


def relative_weight_error(pred_dir: Path, real_dir: Path, base_dir: Path) -> float:
    """||W_pred - W_real|| / ||W_real - W_0|| with the norms taken over all tensors of the real checkpoint.

    A tensor the prediction omits must be a tied alias (``lm_head.weight`` with tied embeddings) that
    the real checkpoint also stores under another name; anything else missing is an error.
    """
    pred, real, base = (_tensors(d, base_dir) for d in (pred_dir, real_dir, base_dir))
    num = den = 0.0
    for key, w_real in real.items():
        if key not in pred:
            if key == "lm_head.weight" and "model.embed_tokens.weight" in pred:
                continue
            raise KeyError(f"{pred_dir} lacks tensor {key}")
        num += float((pred[key] - w_real).pow(2).sum())
        den += float((w_real - base[key]).pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.inf


def drift(base_dir: Path, model_dirs: list[Path]) -> list[dict[str, float]]:
    """||W_t - W_0|| of each folder and the cosine of its delta with the last folder's delta.

    Shows whether the real run moves along a line (norm ~ linear in t, cosine ~ 1), the premise
    that every linear extrapolation relies on.
    """
    base = _tensors(base_dir, base_dir)

    def delta(d: Path) -> torch.Tensor:
        t = _tensors(d, base_dir)
        return torch.cat([(t[k] - w).flatten() for k, w in sorted(base.items())])

    last = delta(model_dirs[-1])
    out = []
    for d in model_dirs:
        v = delta(d)
        cos = float(v @ last / (v.norm() * last.norm())) if v.norm() > 0 else 0.0
        out.append({"norm": float(v.norm()), "cos_with_last": cos})
    return out
