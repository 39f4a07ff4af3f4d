"""``--executor ray``: tensors, and row blocks of big ones, computed by Ray tasks on any node that sees the files.

Each task rebuilds the trajectory's readers from its absolute paths (storage every node shares) with the
local executor's memory budget, so it reads the same row blocks, and returns a block's Gram matrix or
every target's output bytes for it. The driver sums Gram matrices in block order, fits the weights as the
local executor does, and hands the bytes to the writers in their order: the files are the local
executor's byte for byte, the statistics cache is saved here as before and publishing stays
all-or-nothing. The driver holds at most one memory budget of results, in flight or waiting their turn.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch

from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.materialize.tensor import materialize_tensor, write_block
from relex.materialize.stream import DeltaStream
from relex.methods.base import DirectMethod, Method
from relex.stats.gram import TensorStats
from relex.trajectory import TensorSpec, Trajectory
from relex.version import __version__
from relex.writer import ModelFolderWriter

INSTALL_HINT = "pip install 'relex-rlvr[ray]'"
TASKS_PER_CPU = 2  # tasks queued per CPU of the cluster, so a CPU that finishes finds the next block waiting
PROBE_SECONDS = 3.0  # a cluster's head answers a TCP connect at once; ray.init retried a dead one for 823 s


@dataclass(frozen=True)
class RunContext:
    """What every task of one run needs, put in the object store once."""

    trajectory: Trajectory  # absolute paths, no readers
    method: Method | None  # fitted (for a tensor's weights from its own read); None for statistics only
    targets: list[int]
    budget: MemoryBudget  # the local executor's: the same row blocks, hence the same sums
    version: str  # the driver's relex: a node running another one could write other bytes
    key: str  # tells this run's tasks from another's in a reused worker process
    delta_dtype: str  # the driver's stream's: exact float64 or the reference's float16 deltas


def _portable(trajectory: Trajectory) -> Trajectory:
    """The trajectory with its folders named by absolute path and no readers: cheap to ship, valid on any node."""
    return Trajectory(trajectory.base.resolve(), [replace(c, path=c.path.resolve()) for c in trajectory.checkpoints],
                      trajectory.allow_pickle, trajectory.run)


def _portable_method(method: Method, trajectory: Trajectory) -> Method:
    """A copy of the fitted method whose trajectory is ``trajectory`` (readers stay on the driver)."""
    clone = copy.copy(method)
    clone.trajectory_ = trajectory
    return clone


_WORKER_STREAM: dict[str, DeltaStream] = {}


def _worker_stream(context: RunContext) -> DeltaStream:
    """This worker process's stream for the run: readers and buffers built once, not once per task."""
    if context.key not in _WORKER_STREAM:
        if context.version != __version__:
            raise RelexError(f"a Ray worker runs relex {__version__}, the driver {context.version}: "
                             "install the same relex on every node")
        _WORKER_STREAM.clear()
        _WORKER_STREAM[context.key] = DeltaStream(context.trajectory, context.budget, "cpu",
                                                  n_outputs=len(context.targets), delta_dtype=context.delta_dtype)
    return _WORKER_STREAM[context.key]


def gram_task(context: RunContext, name: str, r0: int, r1: int) -> np.ndarray:
    """Ray task: the Gram matrix of rows r0:r1's deltas, summed by the driver in block order."""
    return _worker_stream(context).load(name, r0, r1).gram().numpy()


def values_task(context: RunContext, name: str, r0: int, r1: int, weights: np.ndarray | None,
                dtype: torch.dtype) -> tuple[TensorStats | None, np.ndarray]:
    """Ray task: every target's output bytes for rows r0:r1 (one row each). Without ``weights`` (a tensor in
    one block, no statistics yet) its statistics come from the same read, and the weights from them."""
    stream = _worker_stream(context)
    block = stream.load(name, r0, r1)
    stats = None
    if weights is None:
        stats = stream.stats(name, stream.base.specs[name], block)
        weights = context.method.shrunk_weights(stats, context.targets)
    else:
        weights = weights.copy()  # the object store's arrays are read-only, torch wants them writable
    out = np.empty((len(context.targets), block.numel * dtype.itemsize), dtype=np.uint8)
    block.weighted_sums(weights, [torch.from_numpy(row).view(dtype) for row in out])
    return stats, out


@dataclass
class _TensorWork:
    """One tensor on its way through the tasks: blocks not yet asked for, answers not yet written."""

    name: str
    spec: TensorSpec
    dtype: torch.dtype
    row_ranges: deque[tuple[int, int]]
    stats: TensorStats | None = None
    weights: np.ndarray | None = None
    local: bool = False  # integer buffers and empty tensors: copied through by the driver, as locally
    grams: list[Any] = field(default_factory=list)  # Gram tasks of a tensor in several blocks, no statistics yet
    values: deque[tuple[Any, int]] = field(default_factory=deque)  # (values task, its bytes), in block order

    def can_ask(self) -> bool:
        return not self.local and not self.grams and bool(self.row_ranges)


class RayExecutor:
    """Computes the tensors' statistics, or their outputs too, in Ray tasks; the driver writes, in order."""

    def __init__(self, method: Method | None, device: str, address: str | None) -> None:
        """Refuse what the Ray executor does not do before any work starts; ``address`` is ``ray.init``'s."""
        try:
            import ray
        except ImportError:
            raise RelexError(f"--executor ray needs Ray, an optional extra: {INSTALL_HINT}") from None
        if isinstance(method, DirectMethod):
            raise RelexError(f"--method {method.name} reads whole checkpoints per tensor: it runs with "
                             "--executor local only")
        if torch.device(device).type != "cpu":
            raise RelexError(f"--executor ray computes on the Ray cluster's CPUs: drop --device {device}")
        self.ray = ray
        self.address = address
        if not ray.is_initialized():
            _probe(address)

    def statistics(self, stream: DeltaStream, specs: dict[str, TensorSpec]) -> Iterator[tuple[str, TensorStats]]:
        """Every tensor's Gram statistics (one task per row block, summed here in block order), in ``specs``' order."""
        started = self._connect()
        try:
            yield from _Statistics(self.ray, stream, specs).run()
        finally:
            if started:
                self.ray.shutdown()

    def materialize(self, stream: DeltaStream, method: Method, specs: dict[str, TensorSpec],
                    out_dtype: dict[str, torch.dtype], targets: list[int], loaded: dict[str, TensorStats],
                    writers: list[ModelFolderWriter]) -> Iterator[tuple[str, TensorStats]]:
        """Write every tensor, yielding each one's statistics in the writers' order (as the local executor)."""
        started = self._connect()
        try:
            yield from _Writing(self.ray, stream, method, specs, out_dtype, targets, loaded, writers).run()
        finally:
            if started:
                self.ray.shutdown()

    def _connect(self) -> bool:
        """Join the cluster (no address: ``RAY_ADDRESS``, else one ``ray start`` began on this machine, else a new
        local instance); True when this call started Ray. The CLI's SIGTERM handling is kept."""
        if self.ray.is_initialized():
            return False
        handler = signal.getsignal(signal.SIGTERM)
        try:
            self.ray.init(address=self.address, logging_level=logging.getLogger("relex").getEffectiveLevel())
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())  # one line, whatever Ray's message holds
            raise RelexError(f"--ray-address {self.address}: cannot join a Ray cluster ({reason})") from None
        finally:
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, handler)
        return True


def _probe(address: str | None) -> None:
    """Refuse a HOST:PORT address (given, or RAY_ADDRESS's for none or ``auto``; ``ray://`` too) that no TCP connect
    reaches within PROBE_SECONDS, before ray.init retries it for minutes behind pages of logs. ``auto`` without
    RAY_ADDRESS and ``local`` are Ray's to resolve: it refuses those at once when it finds no cluster."""
    text = os.environ.get("RAY_ADDRESS") if address in (None, "auto") else address
    host, colon, port = (text or "").removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, OverflowError) as exc:  # refused, unreachable, timed out, unknown host; a port above 65535
        flag = f"--ray-address {address}" if text == address else f"RAY_ADDRESS {text}"
        raise RelexError(f"{flag}: nothing answers at {host}:{port} ({getattr(exc, 'strerror', None) or exc}); "
                         "is the cluster up (`ray status` on its head node)?") from None


class _Tasks:
    """The driver's side of one run: the shared context, the task functions and the window's counters."""

    def __init__(self, ray: Any, stream: DeltaStream, specs: dict[str, TensorSpec], method: Method | None = None,
                 targets: list[int] | None = None) -> None:
        self.ray, self.stream, self.specs = ray, stream, specs
        trajectory = _portable(stream.trajectory)
        shipped = _portable_method(method, trajectory) if method is not None else None
        self.context = ray.put(RunContext(trajectory, shipped, targets or [], stream.budget, __version__,
                                          uuid.uuid4().hex, stream.delta_dtype))
        self._check_memory()
        self.gram_task = ray.remote(gram_task).options(memory=stream.budget.total)
        self.values_task = ray.remote(values_task).options(memory=stream.budget.total)
        self.max_tasks = max(1, int(ray.cluster_resources().get("CPU", 1) * TASKS_PER_CPU))
        self.in_flight = 0  # tasks asked for whose answers are not used yet

    def _check_memory(self) -> None:
        """Each task asks Ray for one budget of memory: refuse a budget no node has rather than wait forever."""
        largest = max((node["Resources"].get("memory", 0) for node in self.ray.nodes() if node["Alive"]), default=0)
        if largest < self.stream.budget.total:
            raise RelexError(f"--memory-budget {self.stream.budget.total} bytes: no Ray node has that much memory for "
                             f"one task (largest {int(largest)}); lower the budget")

    def _grams(self, name: str) -> list[Any]:
        """One Gram task per row block of the tensor."""
        ranges = self.stream.row_ranges(self.specs[name])
        tasks = [self.gram_task.remote(self.context, name, r0, r1) for r0, r1 in ranges]
        self.in_flight += len(tasks)
        return tasks

    def _summed(self, name: str, tasks: list[Any]) -> TensorStats:
        """The statistics of a tensor from its Gram tasks, summed in block order as ``DeltaStream.stats`` sums."""
        grams = self._get(tasks)
        self.in_flight -= len(tasks)
        return self.stream.checked_stats(name, self.specs[name], sum(grams))

    def _cancel(self, tasks: list[Any]) -> None:
        for task in tasks:
            self.ray.cancel(task)

    def _get(self, tasks: Any) -> Any:
        """``ray.get``, raising a task's own RelexError or OSError as it is (one line for the CLI)."""
        try:
            return self.ray.get(tasks)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, (RelexError, OSError)):
                raise exc.cause from None
            raise


class _Statistics(_Tasks):
    """Gram tasks for every tensor, a window of them in flight, the sums yielded in order."""

    def run(self) -> Iterator[tuple[str, TensorStats]]:
        names = iter(self.specs)
        pending: deque[tuple[str, list[Any]]] = deque()
        try:
            while True:
                while self.in_flight < self.max_tasks and (name := next(names, None)) is not None:
                    pending.append((name, self._grams(name)))
                if not pending:
                    return
                name, tasks = pending[0]
                stats = self._summed(name, tasks)
                pending.popleft()
                yield name, stats
        except BaseException:
            self._cancel([task for _, tasks in pending for task in tasks])
            raise


class _Writing(_Tasks):
    """Ask for blocks in the writers' order while the window has room, write the head tensor's as they come."""

    def __init__(self, ray: Any, stream: DeltaStream, method: Method, specs: dict[str, TensorSpec],
                 out_dtype: dict[str, torch.dtype], targets: list[int], loaded: dict[str, TensorStats],
                 writers: list[ModelFolderWriter]) -> None:
        super().__init__(ray, stream, specs, method, targets)
        self.method, self.out_dtype, self.targets = method, out_dtype, targets
        self.loaded, self.writers = loaded, writers
        self.held = 0  # bytes of output asked for and not yet written: at most one budget (or one block)

    def run(self) -> Iterator[tuple[str, TensorStats]]:
        names = iter(self.writers[0].order)
        active: deque[_TensorWork] = deque()
        try:
            while True:
                self._fill(active, names)
                if not active:
                    return
                if self._advance(active[0]):
                    work = active.popleft()
                    yield work.name, work.stats
        except BaseException:
            self._cancel([task for work in active for task in work.grams + [task for task, _ in work.values]])
            raise

    def _fill(self, active: deque[_TensorWork], names: Iterator[str]) -> None:
        """Ask for blocks in order, starting the next tensors as needed, until the window is full."""
        i = 0
        while self.in_flight < self.max_tasks:
            if i == len(active):
                name = next(names, None)
                if name is None:
                    return
                active.append(self._start(name))
            work = active[i]
            if not work.can_ask():
                i += 1
            elif self.held and self.held + self._block_bytes(work) > self.stream.budget.total:
                return
            else:
                self._ask(work)

    def _start(self, name: str) -> _TensorWork:
        """Plan a tensor: copied here, weights from cached statistics, or Gram tasks first when in several blocks."""
        spec = self.specs[name]
        ranges = self.stream.row_ranges(spec)
        work = _TensorWork(name, spec, self.out_dtype[name], deque(ranges))
        if name in self.loaded:
            work.stats = self.loaded[name].named(name, spec.shape)
        if not spec.dtype.is_floating_point or spec.numel == 0:
            work.local = True
        elif work.stats is not None:
            work.weights = self.method.shrunk_weights(work.stats, self.targets)
        elif len(ranges) > 1:
            work.grams = self._grams(name)
        return work

    def _block_bytes(self, work: _TensorWork) -> int:
        r0, r1 = work.row_ranges[0]
        return len(self.targets) * (r1 - r0) * work.spec.row_numel * work.dtype.itemsize

    def _ask(self, work: _TensorWork) -> None:
        nbytes = self._block_bytes(work)
        r0, r1 = work.row_ranges.popleft()
        work.values.append((self.values_task.remote(self.context, work.name, r0, r1, work.weights, work.dtype),
                            nbytes))
        self.in_flight += 1
        self.held += nbytes

    def _advance(self, work: _TensorWork) -> bool:
        """Move the head tensor one step on (statistics, or one block written); True once it is complete."""
        if work.local:
            work.stats = materialize_tensor(self.stream, work.name, work.spec, work.dtype, self.method,
                                             self.targets, work.stats, self.writers)
            return True
        if work.grams:
            work.stats = self._summed(work.name, work.grams)
            work.grams = []
            work.weights = self.method.shrunk_weights(work.stats, self.targets)
            return False
        if not work.values:
            self._ask(work)  # the head always moves, whatever later tensors hold of the window
        task, nbytes = work.values.popleft()
        stats, values = self._get(task)
        if stats is not None:
            work.stats = replace(stats, gram=stats.gram.copy())  # the object store's arrays are read-only
        with warnings.catch_warnings():  # the writer only reads these bytes: no copy of a read-only array
            warnings.simplefilter("ignore", UserWarning)
            rows = [torch.from_numpy(row).view(work.dtype) for row in values]
        for target, writer, row in zip(self.targets, self.writers, rows):
            write_block(writer, work.name, row, target)
        self.in_flight -= 1
        self.held -= nbytes
        return not work.row_ranges and not work.values
