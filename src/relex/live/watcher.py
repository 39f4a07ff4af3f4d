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

A checkpoint's identity (size, times, inode of its weight files) is taken before its read and checked
after: one rewritten or rotated away meanwhile is not taken (nor cached), and is tried again at the next
poll if it is still there. A prediction ``OUT/step-T`` is replaced only while it is relex's: once the
trainer saves a real checkpoint there (a fresh folder, or its weights written over the prediction's),
the step is taken as a checkpoint and no longer predicted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from relex.analysis.overview import analyze_run
from relex.errors import RelexError
from relex.jsonout import dumps_strict
from relex.materialize import compute_stats, extrapolate
from relex.methods import Relex
from relex.stats import StatsCache, TensorStats, default_cache_dir
from relex.tempfiles import building, refuse_overlap
from relex.trajectory import Checkpoint, TensorSpec, Trajectory
from relex.trajectory.discover import RELEX_OUTPUT_MARKER, model_folder, step_folders
from relex.trajectory.reader import file_fingerprint

if TYPE_CHECKING:
    from relex.verify import VerifyOptions

log = logging.getLogger(__name__)

COMPLETION_MARKERS = ("trainer_state.json",)  # written by transformers' Trainer after the weights
VERL_TRACKER = "latest_checkpointed_iteration.txt"  # verl writes the step there once global_step_N/ is saved
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                "adapter_model.bin")
WATCHED_FILES = WEIGHT_FILES + ("adapter_config.json", "config.json")
STATUS_FILE = "watch.json"
STATUS_LIMIT = 1 << 20  # bytes: a status is a few KB
TRACKER_LIMIT = 64  # bytes: verl's tracker holds one step number


def read_small(path: Path, limit: int) -> str | None:
    """The text of a small regular file, None if there is none. Anything else is refused without being read
    whole or, unless it is a regular file, opened: opening a FIFO blocks, /dev/zero never ends."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise RelexError(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RelexError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else between the stat and the open
            raise RelexError(f"{path}: not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise RelexError(f"{path}: larger than the {limit} bytes expected there")
    return data.decode(errors="replace")


def saved_by_trainer(folder: Path) -> bool:
    """Whether ``folder`` holds weights relex did not write: weights without its ``relex.json``, or weight files
    newer than it (a trainer that saved its own step-T in place over the prediction; relex writes it last)."""
    weights = [p for pattern in WEIGHT_FILES for p in folder.glob(pattern)]
    try:
        marked = (folder / RELEX_OUTPUT_MARKER).stat().st_mtime_ns
    except FileNotFoundError:
        return bool(weights)
    except OSError:
        return True  # unreadable: not known to be relex's
    newest = 0
    for path in weights:
        with contextlib.suppress(FileNotFoundError):  # removed since the listing: no newer weights
            newest = max(newest, path.stat().st_mtime_ns)
    return newest > marked


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
    outputs of an earlier watch of the same run, or ``overwrite`` must be set. A real checkpoint at one of
    its ``step-T`` folders is never replaced, ``overwrite`` or not.
    """

    def __init__(self, base: str | Path, run: str | Path, targets: Sequence[int] = (), out: str | Path | None = None,
                 every: int = 1, settle: float = 30.0, window: int | None = None,
                 cache: str | Path | bool | None = None, memory_budget: str | int = "2GB", device: str = "cpu",
                 overwrite: bool = False, allow_pickle: bool = False, verify: "VerifyOptions | None" = None) -> None:
        self.base, self.run = Path(base), Path(run)
        if not self.base.is_dir():
            raise RelexError(f"{self.base}: base model folder not found")
        if self.run.exists() and not self.run.is_dir():
            raise RelexError(f"{self.run}: not a folder (--run is the folder the trainer writes checkpoints to)")
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
        self.verify = verify  # rewrite a prediction only when it beats the newest checkpoint on these problems
        self.allow_pickle = allow_pickle
        self.steps: list[int] = []  # every step taken, sorted
        self.paths: dict[int, Path] = {}
        self.fingerprints: dict[int, list] = {}
        self.grams: dict[str, np.ndarray] = {}  # per tensor, over self.steps; NaN where unknown
        self.specs: dict[str, TensorSpec] = {}
        self.status: dict | None = None
        self.written: list[Path] = []
        self._warned: set[Path] = set()  # paths already warned about (incomplete checkpoints, a missing run ...)
        self._since_write = 0
        self._base_fp = self._trajectory([]).reader(self.base).fingerprint()
        self._cache_folder = None if cache is False else (
            default_cache_dir() if cache in (None, True) else Path(cache))
        if self.out is not None:
            self._claim_out(overwrite)

    def _warn_once(self, path: Path, message: str, *args) -> None:
        """A warning about ``path``, the first time only: the run folder is looked at again and again."""
        if path not in self._warned:
            log.warning(message, *args)
            self._warned.add(path)

    # -- the output folder -----------------------------------------------------------------------
    def prediction(self, target: int) -> Path:
        """The folder the prediction at ``target`` is written to."""
        assert self.out is not None
        return self.out / f"step-{target}"

    def _claim_out(self, overwrite: bool) -> None:
        """Refuse an --out holding anything but an earlier watch of this run's outputs, unless ``overwrite``;
        refuse always a real checkpoint at a target, and a target folder that is or holds --run or --base."""
        assert self.out is not None
        for target in self.targets:
            folder = self.prediction(target)
            refuse_overlap(folder, run=self.run, base=self.base)
            if saved_by_trainer(folder):
                raise RelexError(f"{folder}: a training checkpoint, not a prediction relex wrote; watch never "
                                 f"replaces one: choose another --out or drop --target {target}")
        if self.out.resolve() == self.run.resolve():
            log.warning("--out %s is the run folder: a prediction's step-T/ there has the name of the trainer's own "
                        "step T; relex stops predicting a step the trainer saves and never replaces it, but other "
                        "tools may take the predictions for training checkpoints", self.out)
        status = self.out / STATUS_FILE
        try:
            ours = json.loads(read_small(status, STATUS_LIMIT) or "{}").get("run") == str(self.run.resolve())
        except (RelexError, ValueError, AttributeError, RecursionError):  # not a status of ours, whatever it holds
            ours = False
        taken = [p for p in [status] + [self.prediction(t) for t in self.targets] if os.path.lexists(p)]
        if taken and not ours and not overwrite:
            raise RelexError(f"{taken[0]}: output exists and was not written by a watch of {self.run}; "
                             "pass --overwrite to replace it")

    def _release_saved_targets(self) -> None:
        """Stop predicting a step the trainer saved itself at its ``step-T``; the checkpoint is never replaced,
        and the ``relex.json`` left in it (saved in place) goes, so that it reads as the checkpoint it is."""
        for target in list(self.targets):
            folder = self.prediction(target)
            if not saved_by_trainer(folder):
                continue
            self.targets.remove(target)
            with contextlib.suppress(FileNotFoundError):
                (folder / RELEX_OUTPUT_MARKER).unlink()
            log.warning("%s: holds weights relex did not write (the trainer's own step %d, saved there); never "
                        "replaced, and no longer predicted", folder, target)

    def _write_status(self) -> None:
        """``out/watch.json``: the latest status, written to a new temporary file and renamed over (never
        written through whatever is at the name: a link, a FIFO)."""
        if self.out is None or self.status is None:
            return
        path = self.out / STATUS_FILE
        text = dumps_strict({"run": str(self.run.resolve()), **self.status}, indent=2) + "\n"
        try:
            with building(path, overwrite=True, folder=False) as tmp:
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as file:
                    file.write(text)
        except OSError as exc:
            raise RelexError(f"{path}: cannot write ({exc.strerror or exc})") from None

    # -- finding complete checkpoints ------------------------------------------------------------
    def _trajectory(self, checkpoints: list[Checkpoint]) -> Trajectory:
        """A fresh trajectory (fresh readers: a folder rewritten since is read as it is now)."""
        return Trajectory(self.base, checkpoints, self.allow_pickle)

    def ready(self) -> list[Checkpoint]:
        """Checkpoints complete now and not taken yet, by step (a folder still being written is left for later)."""
        if not self.run.is_dir():
            self._warn_once(self.run, "%s: the run folder does not exist yet; waiting for it", self.run)
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
                self._warn_once(model, "%s; waiting until it is complete", exc)
                continue
            found.append(Checkpoint(step, model))
        return sorted(found, key=lambda c: c.step)

    def _marked(self, step: int, folder: Path, layout: str) -> bool:
        """Whether the trainer says the checkpoint is complete (TRL's trainer_state.json, verl's tracker file)."""
        if any((folder / m).is_file() for m in COMPLETION_MARKERS):
            return True
        if layout != "verl":
            return False
        tracker = self.run / VERL_TRACKER
        try:
            return int((read_small(tracker, TRACKER_LIMIT) or "").strip()) >= step
        except RelexError as exc:
            self._warn_once(tracker, "%s; not taken as verl's tracker file", exc)
            return False
        except ValueError:
            return False

    def _fingerprint(self, path: Path) -> list | None:
        """The identity of a checkpoint's weight files now; None if it cannot be read (rotated away)."""
        try:
            return self._trajectory([]).reader(path).fingerprint()
        except (RelexError, OSError):
            return None

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
        fingerprints = {c.step: self._fingerprint(c.path) for c in ready}
        ready = ready[:next((i for i, c in enumerate(ready) if fingerprints[c.step] is None), len(ready))]
        store = self._store(fingerprints)
        for n in range(len(ready), 1, -1):
            steps = [c.step for c in ready[:n]]
            loaded = store.load(steps) if store else None
            if loaded is None:
                continue
            try:
                specs = self._trajectory(ready[:n]).tensor_specs()
            except (RelexError, OSError):  # one was rotated away since: each is read on its own instead
                return
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

    def add(self, ckpt: Checkpoint) -> bool:
        """Take one complete checkpoint: its Gram entries with the window's earlier checkpoints still on disk.

        False, with nothing of the read kept or cached, when it vanished (rotated away) or changed while
        being read: its identity is taken before the read and checked after, and the next poll tries again.
        """
        before = self._fingerprint(ckpt.path)
        if before is None:
            log.warning("step %d: skipped, %s is gone before it was read (rotated away?)", ckpt.step, ckpt.path)
            return False
        earlier = [s for s in self.steps if self.on_disk(s)]
        if self.window is not None:
            earlier = earlier[-(self.window - 1):]
        traj = self._trajectory(sorted([Checkpoint(s, self.paths[s]) for s in earlier] + [ckpt], key=lambda c: c.step))
        try:
            stats, failure = compute_stats(traj, **self.engine, cache=False, progress=False), None
        except (RelexError, OSError) as exc:
            stats, failure = None, exc
        after = self._fingerprint(ckpt.path)
        if after != before:
            log.warning("step %d: skipped, %s %s while being read; read again at the next poll", ckpt.step,
                        ckpt.path, "is gone" if after is None else "changed")
            return False
        if not all(self.on_disk(s) for s in earlier):
            log.info("a checkpoint was rotated away or rewritten while reading step %d; reading again without it",
                     ckpt.step)
            return self.add(ckpt)
        if failure is not None:
            raise failure
        if not self.specs:
            self.specs = traj.tensor_specs()
        self._merge(stats, traj.steps)
        self.paths[ckpt.step], self.fingerprints[ckpt.step] = ckpt.path, before
        self._since_write += 1
        store = self._store(self.fingerprints)
        if store is not None:
            store.save({n: TensorStats(np.array(self.steps, dtype=np.float64), g) for n, g in self.grams.items()},
                       self.steps)
        return True

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
        """Diagnostics, verdict and safe horizon of the current window: ``relex analyze``'s own analysis of it."""
        steps = self.window_steps()
        status: dict = {"step": steps[-1] if steps else None, "checkpoints_taken": len(self.steps),
                        "window": steps, "on_disk": [s for s in self.steps if self.on_disk(s)]}
        if len(steps) < 2:
            return {**status, "verdict": "one checkpoint so far: a line needs two"}
        with warnings.catch_warnings():  # a short window leaves some diagnostics undefined: NaN, reported as null
            warnings.simplefilter("ignore", RuntimeWarning)
            analysis = analyze_run(self.stats(steps), steps)
        diag, horizon = analysis["diagnostics"], analysis["safe_horizon"]
        return {**status, "median": diag["median"],
                "random_walk": {k: v["mean"] for k, v in diag["random_walk"].items()},
                "growth_exponent": diag["whole_model"]["growth_exponent"], "chosen": analysis["chosen"],
                "safe_horizon": horizon, "safe_step": None if horizon is None else int(horizon * steps[-1]),
                "idle_steps": len(diag["idle"]["stalled"]) + len(diag["idle"]["coasting"]),
                "verdict": analysis["verdict"]}

    def write(self, targets: Sequence[int] | None = None) -> list[Path]:
        """Predictions at ``targets`` (default: the watcher's) from the window's checkpoints still on disk."""
        assert self.out is not None
        targets = list(targets or self.targets)
        for target in targets:
            if saved_by_trainer(self.prediction(target)):
                raise RelexError(f"{self.prediction(target)}: a training checkpoint, never replaced by a prediction")
        steps = self.window_steps(on_disk=True)
        if len(steps) < 2:
            raise RelexError(f"{self.run}: fewer than two checkpoints of the window {self.window_steps()} are still "
                             "on disk (rotated away: raise save_total_limit, or lower --window)")
        traj = self._trajectory([Checkpoint(s, self.paths[s]) for s in steps])
        method = Relex().fit(traj, progress=False)
        status = {k: v for k, v in (self.status or {}).items() if k in ("step", "window", "safe_horizon", "verdict")}
        run_info = {"run": str(self.run.resolve()), "watch": status}
        if self.verify is None:
            folders = extrapolate(method, self.out, targets, overwrite=True, stats=self.stats(steps),
                                  cache=False, progress=False, run_info=run_info, **self.engine)
        else:
            from relex.verify import verified_extrapolate

            verdict, folders = verified_extrapolate(method, targets, self.out, self.verify,
                                                    engine={**self.engine, "cache": False}, stats=self.stats(steps),
                                                    progress=False, overwrite=True, run_info=run_info)
            if self.status is not None:
                self.status["verify"] = verdict.as_dict()["decision"]
            if not folders:
                log.info("predictions not rewritten: %s", verdict.summary())
        self.written = folders
        return folders

    def poll(self) -> list[int]:
        """Take every checkpoint complete now; with targets, rewrite the predictions once ``every`` new ones
        were taken since the last write. Returns the steps taken."""
        if self.out is not None:
            self._release_saved_targets()
        ready = self.ready()
        if ready and not self.steps:
            self._resume(ready)
        taken = []
        for ckpt in ready:
            if ckpt.step in self.paths or self.add(ckpt):
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
