"""Checkpoints on disk -> a validated trajectory with lazy, per-tensor reads."""

from relex.trajectory.deltas import TensorDeltas
from relex.trajectory.discover import Checkpoint, discover_checkpoints
from relex.trajectory.peft import AdapterReader
from relex.trajectory.reader import CheckpointReader, TensorSpec
from relex.trajectory.trajectory import Trajectory

__all__ = ["AdapterReader", "Checkpoint", "CheckpointReader", "TensorDeltas", "TensorSpec", "Trajectory",
           "discover_checkpoints"]
