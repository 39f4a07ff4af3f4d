"""A checkpoint stored at another floating precision than the base (fp32 masters beside a bf16 base), read exactly.

The streaming engine reads checkpoints in the base's dtype; rounding fp32 masters to bf16 first would throw
away the precision they were saved for. ``Widened`` presents the base's specs (the dtype outputs are written
in) and gives each delta W - W_0 in float64 from the stored values (``stores_weights`` False: the engine
takes ``read_delta``, never ``read``), so nothing is rounded before the subtraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from relex.trajectory.reader import TensorSpec, exact_delta


class WeightsReader(Protocol):
    """What Widened needs of a reader of whole weights (CheckpointReader, FsdpShardReader, DcpReader)."""

    folder: Path
    files: list[Path]
    specs: dict[str, TensorSpec]

    def read(self, name: str, start: int = 0, stop: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor: ...

    def file_of(self, name: str) -> Path: ...

    def fingerprint(self) -> list[list]: ...

    def close(self) -> None: ...


def _widens(stored: TensorSpec, base: TensorSpec | None) -> bool:
    return (base is not None and stored.dtype != base.dtype and stored.dtype.is_floating_point
            and base.dtype.is_floating_point)


def widened(reader: WeightsReader, base_specs: dict[str, TensorSpec]) -> "WeightsReader | Widened":
    """A Widened view of ``reader`` when the whole checkpoint was saved at one floating precision other than the
    base's; ``reader`` itself otherwise (a checkpoint mixing dtypes unlike its base is refused by name later)."""
    floating = {spec.dtype for spec in reader.specs.values() if spec.dtype.is_floating_point}
    if len(floating) == 1 and any(_widens(spec, base_specs.get(name)) for name, spec in reader.specs.items()):
        return Widened(reader, base_specs)
    return reader


class Widened:
    """A reader of whole weights whose floating dtypes differ from the base's, read as exact float64 deltas."""

    stores_weights = False

    def __init__(self, inner: WeightsReader, base_specs: dict[str, TensorSpec]) -> None:
        self.inner, self.folder, self.files = inner, inner.folder, inner.files
        self.stored_specs = inner.specs
        self.specs = {n: TensorSpec(s.shape, base_specs[n].dtype) if _widens(s, base_specs.get(n)) else s
                      for n, s in inner.specs.items()}

    def file_of(self, name: str) -> Path:
        return self.inner.file_of(name)

    def read(self, name: str, start: int = 0, stop: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the stored values rounded to the base's dtype (for callers that want W, not its delta)."""
        return self.inner.read(name, start, stop).to(self.specs[name].dtype)

    def read_delta(self, name: str, start: int = 0, stop: int | None = None, *, base: torch.Tensor,
                   out: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W - W_0 in float64 from the stored values (exact); ``buffer`` used only when it holds them."""
        stored = self.stored_specs[name]
        need = base.numel() * stored.dtype.itemsize
        value = self.inner.read(name, start, stop, buffer if buffer is not None and buffer.numel() >= need else None)
        return exact_delta(value, base, out)

    def delta_factors(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.inner.close()

    def fingerprint(self) -> list[list]:
        return self.inner.fingerprint()
