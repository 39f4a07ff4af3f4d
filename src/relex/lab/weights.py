"""Relative weight error of a predicted checkpoint against the real one, read from safetensors files."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (small) model folder, fp32, from every ``*.safetensors`` shard."""
    out: dict[str, torch.Tensor] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key).to(torch.float32)
    return out


def relative_weight_error(pred_dir: Path, real_dir: Path, base_dir: Path) -> float:
    """||W_pred - W_real|| / ||W_real - W_0|| with the norms taken over all tensors of the real checkpoint.

    A tensor the prediction omits must be a tied alias (``lm_head.weight`` with tied embeddings) that
    the real checkpoint also stores under another name; anything else missing is an error.
    """
    pred, real, base = _tensors(pred_dir), _tensors(real_dir), _tensors(base_dir)
    num = den = 0.0
    for key, w_real in real.items():
        if key not in pred:
            if key == "lm_head.weight" and "model.embed_tokens.weight" in pred:
                continue
            raise KeyError(f"{pred_dir} lacks tensor {key}")
        num += float((pred[key] - w_real).double().pow(2).sum())
        den += float((w_real - base[key]).double().pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.inf


def drift(base_dir: Path, model_dirs: list[Path]) -> list[dict[str, float]]:
    """||W_t - W_0|| of each folder and the cosine of its delta with the last folder's delta.

    Shows whether the real run moves along a line (norm ~ linear in t, cosine ~ 1), the premise
    that every linear extrapolation relies on.
    """
    base = _tensors(base_dir)

    def delta(d: Path) -> torch.Tensor:
        t = _tensors(d)
        return torch.cat([(t[k] - w).flatten().double() for k, w in sorted(base.items())])

    last = delta(model_dirs[-1])
    out = []
    for d in model_dirs:
        v = delta(d)
        cos = float(v @ last / (v.norm() * last.norm())) if v.norm() > 0 else 0.0
        out.append({"norm": float(v.norm()), "cos_with_last": cos})
    return out
