"""One tensor's way from its checkpoints to every output: statistics, the method's weights or direct prediction,
the weighted sums rounded once, and the writes. Shared by both executors (engine.py's local one, Ray's)."""

from __future__ import annotations

from dataclasses import replace

import torch

from relex.errors import RelexError
from relex.materialize.stream import DeltaStream, all_finite
from relex.methods.base import DirectMethod, Method
from relex.stats import TensorStats
from relex.trajectory import StackedDeltas, TensorSpec
from relex.writer import ModelFolderWriter, dtype_name


def write_block(writer: ModelFolderWriter, name: str, values: torch.Tensor, target: int) -> None:
    """Hand one block of a target's tensor to its writer, refusing Inf or NaN (e.g. an overflowed cast)."""
    if values.dtype.is_floating_point and not all_finite(values):
        raise RelexError(f"{writer.folder}: tensor '{name}' would hold Inf or NaN at step {target} (the prediction "
                         f"overflows {dtype_name(values.dtype)}); choose a nearer --target or a wider --dtype")
    writer.weights.write(name, values)


def materialize_tensor(stream: DeltaStream, name: str, spec: TensorSpec, dtype: torch.dtype, method: Method,
                        targets: list[int], cached: TensorStats | None,
                        writers: list[ModelFolderWriter]) -> TensorStats:
    """Statistics, weights and every target's values for one tensor; returns its statistics."""
    ranges = stream.row_ranges(spec)
    if not spec.dtype.is_floating_point or spec.numel == 0:  # integer buffers are not trained: copy them through
        for r0, r1 in ranges:
            block = stream.base.read(name, r0, r1)
            for writer in writers:
                writer.weights.write(name, block.to(dtype))
        return cached or stream.stats(name, spec)
    if isinstance(method, DirectMethod):
        return materialize_direct(stream, name, spec, dtype, method, targets, cached, writers)
    block = None
    if len(ranges) == 1 and cached is None:
        block = stream.load(name, *ranges[0])
    stats = cached or stream.stats(name, spec, block)
    weights = method.shrunk_weights(stats, targets)
    for r0, r1 in ranges:
        if block is None or len(ranges) > 1:
            block = stream.load(name, r0, r1)
        shape = (r1 - r0,) + spec.shape[1:] if spec.shape else ()
        outs = block.weighted_sums(weights, stream.outputs(dtype, block.numel))
        for target, writer, values in zip(targets, writers, outs):
            write_block(writer, name, values.view(shape), target)
    return stats


def materialize_direct(stream: DeltaStream, name: str, spec: TensorSpec, dtype: torch.dtype, method: DirectMethod,
                        targets: list[int], cached: TensorStats | None,
                        writers: list[ModelFolderWriter]) -> TensorStats:
    """A DirectMethod's tensor: its factors from the deltas (the stack read once when it fits the budget, else
    row blocks read at every visit), then every target's values written a row block at a time."""
    if stream.fits_stacked(spec):
        block = stream.load(name, 0, spec.rows, stacked=True)
        stats = cached or stream.stats(name, spec, block)
        # the files' deltas give the factors only (LoRA): no rows are read through them, nor buffers taken
        deltas = StackedDeltas(*block.stack(), spec.shape, source=stream.trajectory.deltas(name, 0))
    else:
        stats = cached or stream.stats(name, spec)
        deltas = stream.deltas(name)
    prediction = replace(method.predict(name, deltas, stats.steps, targets), scale=method.shrink)
    anchor = [] if prediction.anchor is None else [prediction.anchor]
    for block in deltas.blocks(anchor):
        shape = (block.stop - block.start,) + spec.shape[1:] if spec.shape else ()
        anchor_rows = block.deltas[0] if anchor else None
        for j, (target, writer) in enumerate(zip(targets, writers)):
            delta = prediction.rows(j, block.start, block.stop, anchor_rows)
            write_block(writer, name, stream.cast(delta.reshape(-1).add_(block.base), dtype, shape), target)
    return stats
