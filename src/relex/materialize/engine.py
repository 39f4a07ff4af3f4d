"""The streaming pass: statistics, method weights and weighted sums, tensor by tensor, to the writers.

For each tensor (in the order its bytes go to disk) the checkpoints' rows are read once, as stored, when
they fit the memory budget: the same rows give the Gram matrix, the method turns it into weights, and the
weighted sum is written to every target's folder (float64 deltas all at once when they fit, else by
chunk: stream.Block). A tensor too big for the budget takes two passes over row blocks (Gram, then
sums); cached statistics skip the first.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.materialize.stream import DeltaStream
from relex.materialize.tensor import materialize_tensor
from relex.methods.base import DirectMethod, Method
from relex.stats import StatsCache, TensorStats, default_cache_dir
from relex.stats.gram import whole_model
from relex.stats.summary import summarize, tensor_metrics
from relex.stats.updates import idle_steps, idle_warning
from relex.trajectory import TensorSpec, Trajectory
from relex.trajectory.precision import looks_quantized, quantized_deltas, quantized_warning
from relex.units import parse_size
from relex.version import __version__
from relex.writer import (ModelFolderWriter, PlannedTensor, check_output_free, publish_all,
                          warn_if_no_tokenizer)

if TYPE_CHECKING:
    from relex.materialize.ray_executor import RayExecutor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cache(trajectory: Trajectory, cache: str | Path | bool | None,
           delta_dtype: str = "float64") -> StatsCache | None:
    """The statistics cache of this trajectory's base and checkpoints, for deltas made at ``delta_dtype``."""
    if cache is False:
        return None
    folder = default_cache_dir() if cache in (None, True) else Path(cache)
    base_fp = trajectory.reader(trajectory.base).fingerprint()
    fps = {c.step: trajectory.reader(c.path).fingerprint() for c in trajectory.checkpoints}
    return StatsCache(folder, base_fp, fps, delta_dtype)


def check_precision(trajectory: Trajectory) -> dict:
    """Sample the deltas for quantization (``trajectory.precision``) and warn once per trajectory and its windows
    (``--auto`` computes statistics, then extrapolates: one warning); returns the check for the record."""
    check = quantized_deltas(trajectory)
    if looks_quantized(check) and "quantized" not in trajectory.warned:
        trajectory.warned.add("quantized")
        log.warning("%s", quantized_warning(check))
    return check


def _check_device(device: str) -> str:
    """The device name if torch can compute on it here; a RelexError naming it otherwise."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise RelexError(f"--device {device}: not a device torch knows (use cpu, cuda or cuda:N)") from None
    if kind.type not in ("cpu", "cuda"):
        raise RelexError(f"--device {device}: relex computes on cpu or cuda only")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise RelexError(f"--device {device}: torch sees no CUDA device")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise RelexError(f"--device {device}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return device


def compute_stats(trajectory: Trajectory, specs: dict[str, TensorSpec] | None = None, *,
                  memory_budget: MemoryBudget | str | int = "2GB", device: str = "cpu",
                  cache: str | Path | bool | None = None, progress: bool = True, executor: str = "local",
                  ray_address: str | None = None, delta_dtype: str = "float64") -> dict[str, TensorStats]:
    """Per-tensor Gram statistics of an observed trajectory, from the cache when it covers them
    (``executor="ray"``: computed by Ray tasks, the same numbers; ``delta_dtype="float16"``: of the RELEX
    reference code's fp16 deltas, ``stream.DELTA_DTYPES``)."""
    ray = _ray_executor(executor, None, device, ray_address)
    specs = specs if specs is not None else trajectory.tensor_specs()
    store = _cache(trajectory, cache, delta_dtype)
    loaded = store.load(trajectory.steps) if store else None
    if loaded is not None and specs.keys() <= loaded.keys():
        log.info("statistics for %d tensors loaded from %s", len(specs), store.path)
        return {name: loaded[name].named(name, spec.shape) for name, spec in specs.items()}
    check_precision(trajectory)  # sampled reads: only when the checkpoints are read anyway (a cache hit reads none)
    stream = DeltaStream(trajectory, MemoryBudget.from_flag(memory_budget), _check_device(device),
                         delta_dtype=delta_dtype)
    stats = {}
    with tqdm(total=sum(_pass_bytes(s, len(trajectory.steps)) for s in specs.values()), unit="B",
              unit_scale=True, desc="statistics", disable=not progress) as bar:
        tensors = ray.statistics(stream, specs) if ray else ((n, stream.stats(n, s)) for n, s in specs.items())
        for name, tensor_stats in tensors:
            stats[name] = tensor_stats
            bar.update(_pass_bytes(specs[name], len(trajectory.steps)))
    if store:
        store.save(stats, trajectory.steps)
    return stats


def _pass_bytes(spec: TensorSpec, n_checkpoints: int) -> int:
    """Bytes one pass over a tensor reads: the base and every observed checkpoint."""
    return spec.numel * spec.dtype.itemsize * (n_checkpoints + 1)


def extrapolate(method: Method, out_dir: str | Path, targets: Sequence[int], *,
                overwrite: bool = False, max_shard_size: str | int = "5GB", dtype: str | None = None,
                memory_budget: MemoryBudget | str | int = "2GB", device: str = "cpu",
                cache: str | Path | bool | None = None, progress: bool = True, run_info: dict | None = None,
                stats: dict[str, TensorStats] | None = None, executor: str = "local",
                ray_address: str | None = None, delta_dtype: str = "float64") -> list[Path]:
    """Write ``out_dir/step-{T}`` for each target T from a fitted method: a loadable HF model folder each.

    The method's own observed trajectory (``method.fit``'s) is read; returns the folders. ``stats`` (from
    ``compute_stats`` on that trajectory) skips the Gram pass, cache or not. ``executor="ray"`` computes the
    tensors in Ray tasks (``ray_address``: ``ray.init``'s) with the same bytes written (``ray_executor``).
    ``delta_dtype="float16"`` makes the deltas as the RELEX reference code does, to compare with published numbers
    (weighted-sum methods only; ``stats``, if given, must be of the same deltas).
    """
    trajectory = getattr(method, "trajectory_", None)
    if trajectory is None:
        raise RelexError(f"{method.name}: fit the method on a trajectory before extrapolating")
    if delta_dtype != "float64" and isinstance(method, DirectMethod):
        raise RelexError(f"--delta-dtype {delta_dtype} reproduces the reference's weighted sums; --method "
                         f"{method.name} reads its deltas exactly: use the default float64")
    targets = sorted(set(int(t) for t in targets))
    if not targets:
        raise RelexError("give at least one --target step")
    method.check_targets(targets, trajectory.steps)
    out_dir = Path(out_dir)
    folders = [out_dir / f"step-{t}" for t in targets]
    for folder in folders:
        check_output_free(folder, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise RelexError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    specs = trajectory.tensor_specs()
    precision = check_precision(trajectory)
    config = trajectory.base_config()
    warn_if_no_tokenizer(trajectory.base)
    out_dtype = {n: DTYPES[dtype] if dtype and s.dtype.is_floating_point else s.dtype for n, s in specs.items()}
    planned = [PlannedTensor(n, s.shape, out_dtype[n]) for n, s in specs.items()]

    store = _cache(trajectory, cache, delta_dtype)
    loaded = stats or (store.load(trajectory.steps) if store else None) or {}
    stream = DeltaStream(trajectory, MemoryBudget.from_flag(memory_budget), _check_device(device),
                         n_outputs=len(targets), delta_dtype=delta_dtype)
    ray = _ray_executor(executor, method, device, ray_address)
    materialize = ray.materialize if ray else materialize_locally
    _warn_if_inside_run(out_dir, trajectory)
    _warn_if_buffers_moved(stream, specs)
    created_root = not out_dir.exists()
    writers: list[ModelFolderWriter] = []
    stats = {}
    try:
        for folder in folders:
            writers.append(ModelFolderWriter(folder, trajectory.base, config, planned, parse_size(max_shard_size)))
        order = writers[0].order
        passes = {n: 1 if n in loaded or len(stream.row_ranges(specs[n])) == 1 else 2 for n in order}
        total = sum(_pass_bytes(specs[n], len(trajectory.steps)) * passes[n] for n in order)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{method.name} -> {len(targets)} target(s)",
                  disable=not progress) as bar:
            for name, tensor_stats in materialize(stream, method, specs, out_dtype, targets, loaded, writers):
                stats[name] = tensor_stats
                bar.update(_pass_bytes(specs[name], len(trajectory.steps)) * passes[name])
        if store and not loaded:
            store.save(stats, trajectory.steps)
        summary = summarize([tensor_metrics(n, specs[n].numel, stats[n]) for n in order])
        summary["idle_steps"] = idle = idle_steps(whole_model(stats))
        if idle["stalled"] or idle["coasting"]:
            log.warning("the observed window has idle steps: %s", idle_warning(idle, len(trajectory.steps)))
        metas = [{"relex_version": __version__, "method": method.name, "params": method.params(),
                  "target": target, "observed_steps": trajectory.steps, "base": str(trajectory.base.resolve()),
                  "dtype": dtype or "input", "delta_dtype": delta_dtype,
                  "stored_dtypes": trajectory.stored_dtypes(), "quantized_deltas": precision,
                  "trajectory_summary": summary, **(run_info or {})}
                 for target in targets]
        publish_all(writers, metas, overwrite)
    except BaseException:
        for writer in writers:
            writer.abort()
        if created_root and out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return folders


def _ray_executor(executor: str, method: Method | None, device: str, ray_address: str | None) -> RayExecutor | None:
    """None for the local executor; for ``ray``, the Ray one, checked before any work starts."""
    if executor == "local":
        return None
    if executor != "ray":
        raise RelexError(f"--executor {executor}: choose local or ray")
    from relex.materialize.ray_executor import RayExecutor

    return RayExecutor(method, device, ray_address)


def materialize_locally(stream: DeltaStream, method: Method, specs: dict[str, TensorSpec],
                        out_dtype: dict[str, torch.dtype], targets: list[int], loaded: dict[str, TensorStats],
                        writers: list[ModelFolderWriter]) -> Iterator[tuple[str, TensorStats]]:
    """The local executor: tensor by tensor in the writers' order, in this process; yields each one's statistics."""
    for name in writers[0].order:
        cached = loaded[name].named(name, specs[name].shape) if name in loaded else None
        yield name, materialize_tensor(stream, name, specs[name], out_dtype[name], method, targets, cached, writers)


def _warn_if_inside_run(out_dir: Path, trajectory: Trajectory) -> None:
    """Outputs inside the run folder are never read back as checkpoints (relex.json marks them), but say so."""
    if trajectory.run is not None and out_dir.resolve().is_relative_to(trajectory.run.resolve()):
        log.warning("--out %s is inside the run folder %s: relex skips its own outputs there, but other tools "
                    "may take them for training checkpoints", out_dir, trajectory.run)


def _warn_if_buffers_moved(stream: DeltaStream, specs: dict[str, TensorSpec]) -> None:
    """Integer and bool tensors are written with the base's values: name those the last observed checkpoint holds
    otherwise, in one warning (compared a row block at a time; an adapter checkpoint moves none)."""
    last = stream.readers[-1]
    if not last.stores_weights:
        return
    moved = [name for name, spec in specs.items() if not spec.dtype.is_floating_point and spec.numel and any(
        not torch.equal(stream.base.read(name, r0, r1), last.read(name, r0, r1)) for r0, r1 in stream.row_ranges(spec))]
    if moved:
        log.warning("%d integer or bool tensor(s) differ between the base and step %d and are written with the "
                    "base's values (relex extrapolates floating-point tensors only): %s%s", len(moved),
                    stream.trajectory.steps[-1], ", ".join(moved[:5]), ", ..." if len(moved) > 5 else "")
