"""Whether a run's deltas look quantized: mostly exact zeros, only a few distinct values, or moves of one ulp.

Weights kept in 16 bits during training cannot move by less than half an ulp (bf16: 2^-9 of the weight), so
with a small learning rate most stay exactly where they were; a 16-bit export of fp32 masters rounds the same
way. relex subtracts exactly, but a fit to rounding is a fit to noise. Cheap: the first rows (at most
SAMPLE_ELEMENTS) of up to SAMPLE_TENSORS tensors, last observed checkpoint against the base.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from relex.trajectory.trajectory import Trajectory

SAMPLE_TENSORS = 16
SAMPLE_ELEMENTS = 4096
MIN_ELEMENTS = 256     # smaller tensors (norms, biases) have too few entries to judge
ZERO_SHARE = 0.5       # a tensor whose sampled delta is at least this share of exact zeros is quantized, ...
DISTINCT_SHARE = 1 / 16  # ... or at most this share of distinct values (fp32 deltas: nearly all distinct), ...
ULP_SHARE = 0.5        # ... or at least this share of moves of one ulp or less of the stored format
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def _quantized(delta: torch.Tensor, base: torch.Tensor, stored: torch.dtype) -> tuple[bool, float]:
    """(whether one tensor's sampled delta looks quantized, its share of exact zeros)."""
    zeros = float((delta == 0).double().mean())
    distinct = torch.unique(delta).numel()
    _, exponent = torch.frexp(base)
    ulp = torch.ldexp(torch.ones_like(base), exponent - 1 - _MANTISSA_BITS.get(stored, 23)) * (base != 0)
    within_ulp = float((delta.abs() <= ulp).double().mean())
    return zeros >= ZERO_SHARE or distinct <= DISTINCT_SHARE * delta.numel() or within_ulp >= ULP_SHARE, zeros


def quantized_deltas(trajectory: Trajectory) -> dict:
    """Sampled tensors of the last observed checkpoint whose delta from the base looks quantized: ``step``,
    ``sampled``, ``quantized`` (a count), ``zero_share`` (the median share of exact zeros), ``stored`` (the
    checkpoint's floating dtypes as saved)."""
    step = trajectory.checkpoints[-1]
    base, last = trajectory.reader(trajectory.base), trajectory.reader(step.path)
    names = [n for n, s in base.specs.items() if s.dtype.is_floating_point and s.numel >= MIN_ELEMENTS
             and n in last.specs]
    names = names[::max(1, math.ceil(len(names) / SAMPLE_TENSORS))][:SAMPLE_TENSORS]
    stored = getattr(last, "stored_specs", last.specs)
    verdicts = []
    for name in names:
        spec = base.specs[name]
        rows = max(1, min(spec.rows, SAMPLE_ELEMENTS // max(spec.row_numel, 1)))
        base_rows = base.read(name, 0, rows).reshape(-1).to(torch.float64)
        delta = last.read_delta(name, 0, rows, base=base_rows).reshape(-1)
        verdicts.append(_quantized(delta, base_rows, stored[name].dtype))
    return {"step": step.step, "sampled": len(verdicts), "quantized": sum(q for q, _ in verdicts),
            "zero_share": statistics.median(z for _, z in verdicts) if verdicts else 0.0,
            "stored": sorted({str(s.dtype).removeprefix("torch.") for s in stored.values()
                              if s.dtype.is_floating_point})}


def looks_quantized(check: dict) -> bool:
    """Most sampled tensors' deltas look quantized."""
    return check["sampled"] > 0 and check["quantized"] * 2 > check["sampled"]


def quantized_warning(check: dict) -> str:
    """One line for a run whose deltas look quantized (``quantized_deltas``), naming the cause."""
    sixteen = any(d in ("bfloat16", "float16") for d in check["stored"])
    cause = ("its checkpoints hold 16-bit weights: weights kept in 16 bits during training cannot move by less than "
             "half an ulp, and a 16-bit export of fp32 masters (verl's model_merger, OpenRLHF's _hf folders) rounds "
             "the same way; read the fp32 weights if the trainer saved them (verl: the FSDP shards in "
             "global_step_N/actor/, see docs/trainers.md)" if sixteen else
             "its checkpoints hold values on a 16-bit grid though saved as "
             f"{'/'.join(check['stored']) or 'floats'} (a 16-bit model or export cast up on save)")
    return (f"the deltas look quantized: in {check['quantized']} of {check['sampled']} sampled tensors, step "
            f"{check['step']} minus the base is mostly exact zeros, a few distinct values or moves of one ulp (median "
            f"{check['zero_share']:.0%} zeros); {cause}. Fits to these deltas fit rounding, not training")
