"""One tensor's deltas W_t - W_0, read a whole checkpoint at a time, for methods that are not weighted sums."""

from __future__ import annotations

from typing import Sequence

import torch

from relex.trajectory.peft import AdapterReader
from relex.trajectory.reader import CheckpointReader


class TensorDeltas:
    """The deltas of one tensor: ``deltas[t]`` is checkpoint t's whole W_t - W_0 as a new float64 tensor of
    the tensor's shape, ``len(deltas)`` the number of checkpoints.

    Methods that are not weighted sums (AlphaRL, NExt) work checkpoint by checkpoint, so their memory is a
    few copies of the largest tensor, whatever the number of checkpoints (a stacked tensor serves too).
    ``buffer`` (uint8, the tensor's bytes or more) is reused for every read instead of a fresh one each.
    """

    def __init__(self, base: CheckpointReader, readers: Sequence[CheckpointReader | AdapterReader], name: str,
                 device: str | torch.device = "cpu", buffer: torch.Tensor | None = None) -> None:
        self.readers, self.name, self.buffer = readers, name, buffer
        self.spec = base.specs[name]
        self.base = base.read(name).to(device=device, dtype=torch.float64).reshape(self.spec.shape)

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.readers[index].read_delta(self.name, base=self.base, buffer=self.buffer)
