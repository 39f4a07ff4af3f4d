"""The memory budget of a command: ``--memory-budget`` parsed once and handed down to everything that reads rows.

Of the budget, relex keeps FIXED_OVERHEAD for small temporaries and allocator fragmentation; the rest (``rows``)
bounds the row blocks the engine and the direct methods read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from relex.units import parse_size

FIXED_OVERHEAD = 64 << 20  # slack for small temporaries and allocator fragmentation
SLOW_BUDGET = 2 * FIXED_OVERHEAD  # below it a large tensor is read a few rows per block (measured: 30 min vs 6 s)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes a command may hold at a time (``total``), of which ``rows`` are left for tensor rows."""

    total: int

    @classmethod
    def of(cls, size: MemoryBudget | str | int) -> MemoryBudget:
        """``size`` as a budget (text such as ``2GB``, or bytes); a budget made already is kept as it is."""
        return size if isinstance(size, MemoryBudget) else cls(parse_size(size))

    @classmethod
    def from_flag(cls, size: MemoryBudget | str | int) -> MemoryBudget:
        """``--memory-budget`` as a budget, warning when it is made (not when handed down) if it leaves no room for
        rows."""
        if isinstance(size, MemoryBudget):
            return size
        budget = cls.of(size)
        if 0 < budget.total < SLOW_BUDGET:
            log.warning("--memory-budget of %d bytes leaves %d for rows beside relex's fixed %d MiB: large tensors "
                        "are read a few rows at a time, which can be hundreds of times slower; give it at least 256MB",
                        budget.total, budget.rows, FIXED_OVERHEAD >> 20)
        return budget

    @property
    def rows(self) -> int:
        """The bytes left for rows beside the fixed overhead (none when the budget is below it)."""
        return max(self.total - FIXED_OVERHEAD, 0)
