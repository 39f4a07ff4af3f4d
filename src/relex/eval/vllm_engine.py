"""One vLLM engine that scores many candidates: each candidate's weights are loaded into it in place.

This is how RL trainers refresh their rollout engine after every step: TRL's GRPOTrainer in colocate mode
(``trl/generation/vllm_generation.py``), verl's FSDP-vLLM sharding manager and OpenRLHF's ``update_weight`` all
hand Hugging Face ``(name, tensor)`` pairs to the model's own ``load_weights`` (which maps them onto vLLM's fused
layers, copying in place) and then reset the prefix cache, whose KV blocks were computed with the old weights.
As in TRL's colocate mode, the engine runs in this process (vLLM V1 multiprocessing off), so the pairs are
handed over by reference, with no IPC or NCCL group. vLLM is imported only when an engine is opened.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from relex.errors import RelexError

if TYPE_CHECKING:
    from relex.analysis.probe import WeightLoader

Pairs = list[tuple[str, torch.Tensor]]
LOAD_ERRORS = (KeyError, ValueError, RuntimeError, AssertionError)  # what a model's load_weights raises on a bad pair


class WeightPairs:
    """A candidate's weights as (Hugging Face name, tensor) pairs: WeightLoader's weighted sums written into a
    host copy of the checkpoints' trained tensors (allocated once, reused for every candidate).

    ``dtype``: the floating tensors' dtype (the engine's, so the float64 sums are rounded once; default: as stored).
    Integer tensors are not trained (WeightLoader skips them): they are no pair, the engine keeps the base's."""

    def __init__(self, loader: "WeightLoader", dtype: torch.dtype | None = None) -> None:
        self.loader = loader
        self.tensors = {name: torch.empty(spec.shape, dtype=dtype or spec.dtype)
                        for name, spec in loader.specs.items() if spec.dtype.is_floating_point and spec.numel}

    def __call__(self, steps: list[int], weights: np.ndarray | dict[str, np.ndarray]) -> Pairs:
        """The pairs of W_0 + sum_t weights[t] (W_t - W_0) over the checkpoints at ``steps`` (WeightLoader.fill)."""
        self.loader.fill(self.tensors, steps, weights)
        return list(self.tensors.items())


def driver_model(llm: Any) -> torch.nn.Module:
    """The engine's torch model, reached as TRL reaches it in colocate mode
    (``llm_engine.model_executor.driver_worker.model_runner.model``: vLLM's V0 worker, and V1's worker wrapper,
    which forwards attributes to its worker), else one level deeper, as verl reached it on vLLM 0.7-0.8's V1
    (``driver_worker.worker.model_runner.model``)."""
    worker = getattr(getattr(llm.llm_engine, "model_executor", None), "driver_worker", None)
    for holder in (worker, getattr(worker, "worker", None)):
        model = getattr(getattr(holder, "model_runner", None), "model", None)
        if model is not None and callable(getattr(model, "load_weights", None)):
            return model
    raise RelexError("--backend vllm: this vLLM's engine keeps its model out of this process's reach "
                     "(no llm_engine.model_executor.driver_worker[.worker].model_runner.model); use --backend hf")


class VllmEngine:
    """A vLLM ``LLM`` whose weights are replaced in place before each candidate's greedy generation."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.model = driver_model(llm)
        first = next(self.model.parameters())
        self.device, self.dtype = first.device, first.dtype  # where the weights live, and in what precision

    def load(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``pairs`` (Hugging Face names) into the engine's weights, one tensor on the GPU at a time, then
        drop every cached KV block: those were computed with the previous weights."""
        try:
            self.model.load_weights((name, tensor.to(self.device)) for name, tensor in pairs)
        except LOAD_ERRORS as exc:
            raise RelexError(f"--backend vllm: the engine refused a candidate's weights "
                             f"({type(exc).__name__}: {str(exc).split(chr(10))[0]})") from None
        if self.llm.reset_prefix_cache() is False:  # vLLM >= 0.9 says False while requests hold cached blocks
            raise RelexError("--backend vllm: vLLM kept its prefix cache after a weight load (requests still "
                             "running); the next candidate would reuse the old weights' KV blocks")

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation (token ids) of each tokenized prompt, in order."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


@lru_cache(maxsize=None)
def open_engine(model: Path, tokenizer: Path) -> VllmEngine:
    """The process's one engine for the model folder ``model`` (built on first use: a watch reuses it at every
    poll), its engine core in this process so that its model can be reached and loaded in place."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # what vLLM sets for TRL's external launcher, before it reads it
    from vllm import LLM

    return VllmEngine(LLM(model=str(model), tokenizer=str(tokenizer), dtype="auto", seed=0))
