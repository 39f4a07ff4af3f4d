"""Checkpoints on disk -> a validated trajectory with lazy, per-tensor reads."""

from relex.trajectory.discover import Checkpoint, discover_checkpoints
from relex.trajectory.reader import CheckpointReader, TensorSpec
from relex.trajectory.trajectory import Trajectory

__all__ = ["Checkpoint", "CheckpointReader", "TensorSpec", "Trajectory", "discover_checkpoints"]
