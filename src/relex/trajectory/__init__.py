"""Checkpoints on disk -> a validated trajectory with lazy, per-tensor reads."""

from relex.trajectory.dcp import DcpReader
from relex.trajectory.deltas import BufferPool, ReadDeltas, RowBlock, StackedDeltas, TensorDeltas
from relex.trajectory.discover import Checkpoint, discover_checkpoints
from relex.trajectory.fsdp import FsdpShardReader
from relex.trajectory.peft import AdapterReader
from relex.trajectory.reader import CheckpointReader, TensorSpec
from relex.trajectory.trajectory import Trajectory

__all__ = ["AdapterReader", "BufferPool", "Checkpoint", "CheckpointReader", "DcpReader", "FsdpShardReader", "ReadDeltas",
           "RowBlock", "StackedDeltas", "TensorDeltas", "TensorSpec", "Trajectory", "discover_checkpoints"]
