"""Inference-time methods: decoders that combine models instead of writing new weights."""

from relex.inference.logits import extrapolation_alpha, generate_extrapolated

__all__ = ["extrapolation_alpha", "generate_extrapolated"]
