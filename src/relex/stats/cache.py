"""Statistics cache: per-tensor Gram matrices saved as safetensors, reused across cutoffs and commands.

A cache entry belongs to one base model; it records the steps and the fingerprint (file, size, mtime,
ctime, inode) of every checkpoint it was computed from, so a rewrite that keeps the size and restores
the mtime still misses. A request is served when all its checkpoints are in the
entry unchanged: the Gram of any subset of steps is a sub-block, so a sweep of cutoffs reads nothing.
An entry may hold unknown (NaN) inner products, between checkpoints never on disk together (``relex
watch`` after the trainer rotated one away): a request whose sub-block holds one is a miss.
The cache is an optimisation: one that cannot be read or written is warned about and skipped.
Grams of the exact deltas and of ``--delta-dtype float16``'s rounded ones live in separate entries, each
recording its delta dtype (an entry without one is exact): neither is ever served for the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from relex.stats.gram import TensorStats
from relex.tempfiles import building, sweep

log = logging.getLogger(__name__)

FORMAT = "relex-stats-2"  # 2: fingerprints carry ctime and inode
EXACT = "float64"  # the deltas' dtype by default (exact W_t - W_0), and of entries that record none


def default_cache_dir() -> Path:
    root = os.environ.get("RELEX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "relex")
    return Path(root)


class StatsCache:
    """Load and save the Gram statistics of a trajectory in ``folder``."""

    def __init__(self, folder: str | Path, base_fingerprint: list, fingerprints: dict[int, list],
                 delta_dtype: str = EXACT) -> None:
        identity = base_fingerprint if delta_dtype == EXACT else [base_fingerprint, delta_dtype]  # exact: names kept
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"stats-{key}.safetensors"
        self.base_fingerprint = base_fingerprint
        self.fingerprints = fingerprints  # step -> fingerprint of the checkpoint wanted now
        self.delta_dtype = delta_dtype

    def load(self, steps: list[int]) -> dict[str, TensorStats] | None:
        """Statistics for exactly ``steps`` if the cache covers them unchanged, else None.

        An entry that cannot be read, or is not laid out as ``save`` writes it, is warned about and missed.
        """
        sweep(self.path.parent)  # temporaries of killed runs
        try:
            if not self.path.is_file():
                return None
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != FORMAT or json.loads(meta["base"]) != self.base_fingerprint:
                    return None
                if meta.get("delta_dtype", EXACT) != self.delta_dtype:
                    return None
                cached = _checkpoints(meta["checkpoints"])
                if any(cached.get(s) != self.fingerprints[s] for s in steps):
                    return None
                cached_steps = np.array(sorted(cached), dtype=np.float64)
                out = {}
                for key in handle.keys():
                    full = TensorStats(cached_steps, _gram(key, handle.get_tensor(key), len(cached)))
                    out[key.removeprefix("gram:")] = full.subset(steps)
                if not all(np.isfinite(s.gram).all() for s in out.values()):
                    return None
                return out
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            log.warning("ignoring unreadable statistics cache %s (%s)", self.path, exc)
            return None

    def save(self, stats: dict[str, TensorStats], steps: list[int]) -> None:
        """Write the statistics atomically (temporary name, then rename); on failure warn and go on."""
        tensors = {f"gram:{name}": torch.from_numpy(np.ascontiguousarray(s.gram)) for name, s in stats.items()}
        meta = {"format": FORMAT, "base": json.dumps(self.base_fingerprint), "delta_dtype": self.delta_dtype,
                "checkpoints": json.dumps({str(s): self.fingerprints[s] for s in steps})}
        try:
            with building(self.path, overwrite=True, folder=False) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        except (OSError, SafetensorError) as exc:
            log.warning("statistics cache not written to %s (%s); carrying on without it", self.path.parent, exc)


def _checkpoints(text: str) -> dict[int, list]:
    """The entry's ``checkpoints`` metadata, step -> fingerprint; ValueError if it is not that."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or not all(isinstance(fp, list) for fp in doc.values()):
        raise ValueError("its checkpoints are not an object of step -> fingerprint")
    return {int(s): fp for s, fp in doc.items()}


def _gram(key: str, tensor: torch.Tensor, n_steps: int) -> np.ndarray:
    """A stored Gram matrix as ``save`` writes it (float64, one row and column per step); ValueError if not."""
    if not key.startswith("gram:") or tensor.dtype != torch.float64 or tuple(tensor.shape) != (n_steps, n_steps):
        raise ValueError(f"{key} is not a {n_steps} x {n_steps} float64 Gram matrix "
                         f"({tensor.dtype}, {tuple(tensor.shape)})")
    return tensor.numpy()
