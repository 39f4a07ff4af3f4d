"""Statistics cache: per-tensor Gram matrices saved as safetensors, reused across cutoffs and commands.

A cache entry belongs to one base model; it records the steps and the fingerprint (file, size, mtime,
ctime, inode) of every checkpoint it was computed from, so a rewrite that keeps the size and restores
the mtime still misses. A request is served when all its checkpoints are in the
entry unchanged: the Gram of any subset of steps is a sub-block, so a sweep of cutoffs reads nothing.
An entry may hold unknown (NaN) inner products, between checkpoints never on disk together (``relex
watch`` after the trainer rotated one away): a request whose sub-block holds one is a miss.
The cache is an optimisation: one that cannot be read or written is warned about and skipped.
"""

from __future__ import annotations

import contextlib
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
from relex.tempfiles import sweep, temp_path

log = logging.getLogger(__name__)

FORMAT = "relex-stats-2"  # 2: fingerprints carry ctime and inode


def default_cache_dir() -> Path:
    root = os.environ.get("RELEX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "relex")
    return Path(root)


class StatsCache:
    """Load and save the Gram statistics of a trajectory in ``folder``."""

    def __init__(self, folder: str | Path, base_fingerprint: list, fingerprints: dict[int, list]) -> None:
        key = hashlib.sha256(json.dumps(base_fingerprint).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"stats-{key}.safetensors"
        self.base_fingerprint = base_fingerprint
        self.fingerprints = fingerprints  # step -> fingerprint of the checkpoint wanted now

    def load(self, steps: list[int]) -> dict[str, TensorStats] | None:
        """Statistics for exactly ``steps`` if the cache covers them unchanged, else None."""
        sweep(self.path.parent)  # temporaries of killed runs
        try:
            if not self.path.is_file():
                return None
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != FORMAT or json.loads(meta["base"]) != self.base_fingerprint:
                    return None
                cached = {int(s): fp for s, fp in json.loads(meta["checkpoints"]).items()}
                if any(cached.get(s) != self.fingerprints[s] for s in steps):
                    return None
                cached_steps = np.array(sorted(cached), dtype=np.float64)
                out = {}
                for key in handle.keys():
                    full = TensorStats(cached_steps, handle.get_tensor(key).numpy())
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
        meta = {"format": FORMAT, "base": json.dumps(self.base_fingerprint),
                "checkpoints": json.dumps({str(s): self.fingerprints[s] for s in steps})}
        tmp = temp_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sweep(self.path.parent)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not isinstance(exc, (OSError, SafetensorError)):
                raise
            log.warning("statistics cache not written to %s (%s); carrying on without it", self.path.parent, exc)
