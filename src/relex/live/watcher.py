"""Follow a run folder that a trainer is still writing: statistics, diagnostics and predictions as it goes.

A checkpoint is taken once it is complete: when its trainer says so (TRL and transformers write
``trainer_state.json`` after the weights; verl writes the step to ``latest_checkpointed_iteration.txt``
after ``global_step_N/``) or, without such a marker (OpenRLHF, plain), when its weight files, index and
config have not changed for ``settle`` seconds; either way only once they read back whole. Its Gram
entries <Delta_new, Delta_s> with the earlier checkpoints of the window are exact only from the
weights, so each new checkpoint costs one streaming pass over the base, itself and the earlier
checkpoints still on disk (``window`` caps how many); the result is merged into the Gram over every
step seen, which is saved to the statistics cache.

A checkpoint the trainer rotated away (``save_total_limit``) keeps its entries, but its inner products
with later checkpoints can never be computed: they stay unknown (NaN, which the cache never serves).
Diagnostics use the latest run of steps whose entries are all known; predictions also need the weights
of those steps' checkpoints, so they use the ones of them still on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from relex.analysis.backtest import HORIZONS, MIN_PREFIX, backtest, choose, safe_horizon
from relex.analysis.diagnostics import diagnose, verdict
from relex.errors import RelexError
from relex.jsonout import dumps_strict
from relex.materialize import compute_stats, extrapolate
from relex.methods import Relex
from relex.stats import StatsCache, TensorStats, default_cache_dir
from relex.tempfiles import sweep, temp_path
from relex.trajectory import Checkpoint, TensorSpec, Trajectory
from relex.trajectory.discover import model_folder, step_folders
from relex.trajectory.reader import file_fingerprint

log = logging.getLogger(__name__)

COMPLETION_MARKERS = ("trainer_state.json",)  # written by transformers' Trainer after the weights
VERL_TRACKER = "latest_checkpointed_iteration.txt"  # verl writes the step there once global_step_N/ is saved
WATCHED_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                 "adapter_config.json", "config.json")
STATUS_FILE = "watch.json"


def _last_change(folder: Path) -> float | None:
    """When the files a checkpoint's weights consist of last changed (wall clock); None while there are none."""
    try:
        stats = [(p.name, p.stat().st_mtime) for pattern in WATCHED_FILES for p in folder.glob(pattern)]
    except OSError:  # a file vanished between the listing and the stat: still being written or removed
        return None
    return max(t for _, t in stats) if any(name != "config.json" for name, _ in stats) else None


class Watcher:
    """The statistics of a growing run, its live diagnostics, and predictions at ``targets`` in ``out``.

    ``out`` belongs to the watcher after its first write; at the start it must be empty, hold only the
    outputs of an earlier watch of the same run, or ``overwrite`` must be set.
    """

    def __init__(self, base: str | Path, run: str | Path, targets: Sequence[int] = (), out: str | Path | None = None,
                 every: int = 1, settle: float = 30.0, window: int | None = None,
                 cache: str | Path | bool | None = None, memory_budget: str | int = "2GB", device: str = "cpu",
                 overwrite: bool = False, allow_pickle: bool = False) -> None:
        self.base, self.run = Path(base), Path(run)
        if not self.base.is_dir():
            raise RelexError(f"{self.base}: base model folder not found")
        if every < 1:
            raise RelexError(f"--every {every}: must be at least 1")
        if window is not None and window < 2:
            raise RelexError(f"--window {window}: a line needs at least two checkpoints")
        if targets and out is None:
            raise RelexError("--target needs --out (the folder the predictions are written to)")
        self.targets = sorted(set(int(t) for t in targets))
        for target in self.targets:
            if target <= 0:
                raise RelexError(f"target {target} must be a positive step")
        self.out = Path(out) if out is not None else None
        self.every, self.settle, self.window = every, settle, window
        self.engine = {"memory_budget": memory_budget, "device": device}
        self.allow_pickle = allow_pickle
        self.steps: list[int] = []  # every step taken, sorted
        self.paths: dict[int, Path] = {}
        self.fingerprints: dict[int, list] = {}
        self.grams: dict[str, np.ndarray] = {}  # per tensor, over self.steps; NaN where unknown
        self.specs: dict[str, TensorSpec] = {}
        self.status: dict | None = None
        self.written: list[Path] = []
        self._warned: set[Path] = set()  # incomplete checkpoints already warned about
        self._since_write = 0
        self._base_fp = self._trajectory([]).reader(self.base).fingerprint()
        self._cache_folder = None if cache is False else (
            default_cache_dir() if cache in (None, True) else Path(cache))
        if self.out is not None:
            self._claim_out(overwrite)

    # -- the output folder -----------------------------------------------------------------------
    def _claim_out(self, overwrite: bool) -> None:
        """Refuse an --out holding anything but an earlier watch of this run's outputs, unless ``overwrite``."""
        assert self.out is not None
        status = self.out / STATUS_FILE
        try:
            ours = json.loads(status.read_text()).get("run") == str(self.run.resolve())
        except (OSError, ValueError, AttributeError):
            ours = False
        taken = [p for p in [status] + [self.out / f"step-{t}" for t in self.targets] if p.exists()]
        if taken and not ours and not overwrite:
            raise RelexError(f"{taken[0]}: output exists and was not written by a watch of {self.run}; "
                             "pass --overwrite to replace it")

    def _write_status(self) -> None:
        """``out/watch.json``: the latest status, written to a temporary name and renamed."""
        if self.out is None or self.status is None:
            return
        path = self.out / STATUS_FILE
        tmp = temp_path(path)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            sweep(self.out)
            tmp.write_text(dumps_strict({"run": str(self.run.resolve()), **self.status}, indent=2) + "\n")
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise RelexError(f"{path}: cannot write ({exc.strerror or exc})") from None
            raise

    # -- finding complete checkpoints ------------------------------------------------------------
    def _trajectory(self, checkpoints: list[Checkpoint]) -> Trajectory:
        """A fresh trajectory (fresh readers: a folder rewritten since is read as it is now)."""
        return Trajectory(self.base, checkpoints, self.allow_pickle)

    def ready(self) -> list[Checkpoint]:
        """Checkpoints complete now and not taken yet, by step (a folder still being written is left for later)."""
        if not self.run.is_dir():
            return []
        now = time.time()
        found = []
        for step, folder, layout in step_folders(self.run, warn=False):
            if step in self.paths:
                continue
            try:
                model = model_folder(folder, layout)
            except RelexError:  # verl: no Hugging Face weights there yet
                continue
            changed = _last_change(model)
            if changed is None or (not self._marked(step, folder, layout) and now - changed < self.settle):
                continue
            try:
                self._trajectory([Checkpoint(step, model)]).tensor_specs()
            except (RelexError, OSError) as exc:
                if model not in self._warned:
                    log.warning("%s; waiting until it is complete", exc)
                    self._warned.add(model)
                continue
            found.append(Checkpoint(step, model))
        return sorted(found, key=lambda c: c.step)

    def _marked(self, step: int, folder: Path, layout: str) -> bool:
        """Whether the trainer says the checkpoint is complete (TRL's trainer_state.json, verl's tracker file)."""
        if any((folder / m).is_file() for m in COMPLETION_MARKERS):
            return True
        if layout != "verl":
            return False
        try:
            return int((self.run / VERL_TRACKER).read_text().strip()) >= step
        except (OSError, ValueError):
            return False

    def on_disk(self, step: int) -> bool:
        """Whether a taken checkpoint's weight files are still there, unchanged."""
        try:
            return [file_fingerprint(Path(fp[0])) for fp in self.fingerprints[step]] == self.fingerprints[step]
        except RelexError:
            return False

    # -- statistics ------------------------------------------------------------------------------
    def _store(self, fingerprints: dict[int, list]) -> StatsCache | None:
        return None if self._cache_folder is None else StatsCache(self._cache_folder, self._base_fp, fingerprints)

    def _resume(self, ready: list[Checkpoint]) -> None:
        """Take the longest run of ready checkpoints (from the first) that the statistics cache covers."""
        traj = self._trajectory(ready)
        fingerprints = {c.step: traj.reader(c.path).fingerprint() for c in ready}
        store = self._store(fingerprints)
        for n in range(len(ready), 1, -1):
            steps = [c.step for c in ready[:n]]
            loaded = store.load(steps) if store else None
            if loaded is None:
                continue
            specs = self._trajectory(ready[:n]).tensor_specs()
            if not specs.keys() <= loaded.keys():
                continue
            self.specs = specs
            self.steps = steps
            self._since_write = n
            self.grams = {name: loaded[name].gram for name in specs}
            for ckpt in ready[:n]:
                self.paths[ckpt.step], self.fingerprints[ckpt.step] = ckpt.path, fingerprints[ckpt.step]
            log.info("statistics of steps %s loaded from %s", steps, store.path)
            return

    def add(self, ckpt: Checkpoint) -> None:
        """Take one complete checkpoint: its Gram entries with the window's earlier checkpoints still on disk."""
        earlier = [s for s in self.steps if self.on_disk(s)]
        if self.window is not None:
            earlier = earlier[-(self.window - 1):]
        traj = self._trajectory(sorted([Checkpoint(s, self.paths[s]) for s in earlier] + [ckpt], key=lambda c: c.step))
        try:
            stats = compute_stats(traj, **self.engine, cache=False, progress=False)
        except (RelexError, OSError):
            if all(self.on_disk(s) for s in earlier):
                raise
            log.info("a checkpoint was rotated away while reading step %d; reading again without it", ckpt.step)
            return self.add(ckpt)
        if not self.specs:
            self.specs = traj.tensor_specs()
        self._merge(stats, traj.steps)
        self.paths[ckpt.step] = ckpt.path
        self.fingerprints[ckpt.step] = traj.reader(ckpt.path).fingerprint()
        self._since_write += 1
        store = self._store(self.fingerprints)
        if store is not None:
            store.save({n: TensorStats(np.array(self.steps, dtype=np.float64), g) for n, g in self.grams.items()},
                       self.steps)

    def _merge(self, stats: dict[str, TensorStats], steps: list[int]) -> None:
        """Put a window's Gram into the Gram over every step seen (entries never computed stay NaN)."""
        merged = sorted(set(self.steps) | set(steps))
        old = [merged.index(s) for s in self.steps]
        new = [merged.index(s) for s in steps]
        for name, st in stats.items():
            gram = np.full((len(merged), len(merged)), np.nan)
            if name in self.grams:
                gram[np.ix_(old, old)] = self.grams[name]
            gram[np.ix_(new, new)] = st.gram
            self.grams[name] = gram
        self.steps = merged

    def window_steps(self, on_disk: bool = False) -> list[int]:
        """The latest steps whose inner products are all known (``on_disk``: of those still readable)."""
        candidates = [i for i, s in enumerate(self.steps) if not on_disk or self.on_disk(s)]
        if not candidates:
            return []
        known = np.isfinite(next(iter(self.grams.values())))
        chosen = [candidates[-1]]
        for i in reversed(candidates[:-1]):
            if self.window is not None and len(chosen) == self.window:
                break
            if known[i, chosen].all():
                chosen.append(i)
        return [self.steps[i] for i in sorted(chosen)]

    def stats(self, steps: list[int]) -> dict[str, TensorStats]:
        """Per-tensor statistics of ``steps`` (all of whose inner products are known)."""
        index = [self.steps.index(s) for s in steps]
        arr = np.array(steps, dtype=np.float64)
        return {name: TensorStats(arr, self.grams[name][np.ix_(index, index)], name, spec.shape)
                for name, spec in self.specs.items()}

    # -- diagnostics and predictions -------------------------------------------------------------
    def diagnose(self) -> dict:
        """Diagnostics, verdict and safe horizon of the current window (as ``relex analyze`` computes them)."""
        steps = self.window_steps()
        status: dict = {"step": steps[-1] if steps else None, "checkpoints_taken": len(self.steps),
                        "window": steps, "on_disk": [s for s in self.steps if self.on_disk(s)]}
        if len(steps) < 2:
            return {**status, "verdict": "one checkpoint so far: a line needs two"}
        stats = self.stats(steps)
        with warnings.catch_warnings():  # a short window leaves some diagnostics undefined: NaN, reported as null
            warnings.simplefilter("ignore", RuntimeWarning)
            diag = diagnose(stats)
        rows = backtest(stats) if len(steps) >= 2 * MIN_PREFIX else []
        horizon = safe_horizon(rows, choose(rows, HORIZONS[-1])) if rows else None
        return {**status, "median": diag["median"],
                "random_walk": {k: v["mean"] for k, v in diag["random_walk"].items()},
                "growth_exponent": diag["whole_model"]["growth_exponent"],
                "safe_horizon": horizon, "safe_step": None if horizon is None else int(horizon * steps[-1]),
                "idle_steps": len(diag["idle"]["stalled"]) + len(diag["idle"]["coasting"]),
                "verdict": verdict(diag, horizon)}

    def write(self, targets: Sequence[int] | None = None) -> list[Path]:
        """Predictions at ``targets`` (default: the watcher's) from the window's checkpoints still on disk."""
        assert self.out is not None
        steps = self.window_steps(on_disk=True)
        if len(steps) < 2:
            raise RelexError(f"{self.run}: fewer than two checkpoints of the window {self.window_steps()} are still "
                             "on disk (rotated away: raise save_total_limit, or lower --window)")
        traj = self._trajectory([Checkpoint(s, self.paths[s]) for s in steps])
        method = Relex().fit(traj, progress=False)
        status = {k: v for k, v in (self.status or {}).items() if k in ("step", "window", "safe_horizon", "verdict")}
        run_info = {"run": str(self.run.resolve()), "watch": status}
        folders = extrapolate(method, self.out, list(targets or self.targets), overwrite=True, stats=self.stats(steps),
                              cache=False, progress=False, run_info=run_info, **self.engine)
        self.written = folders
        return folders

    def poll(self) -> list[int]:
        """Take every checkpoint complete now; with targets, rewrite the predictions once ``every`` new ones
        were taken since the last write. Returns the steps taken."""
        ready = self.ready()
        if ready and not self.steps:
            self._resume(ready)
        taken = []
        for ckpt in ready:
            if ckpt.step not in self.paths:
                self.add(ckpt)
            self._warned.discard(ckpt.path)
            taken.append(ckpt.step)
        if not taken:
            return []
        self.status = self.diagnose()
        if self.targets and self._since_write >= self.every and len(self.steps) >= 2:
            try:
                self.write()
                self._since_write = 0
            except (RelexError, OSError) as exc:  # e.g. a checkpoint rotated away mid-write: try again next time
                log.warning("predictions not rewritten this time: %s", exc)
        self._write_status()
        return taken
