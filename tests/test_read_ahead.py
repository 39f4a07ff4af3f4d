"""The engine asks the kernel for the next tensor's bytes while it computes this one (posix_fadvise WILLNEED)."""

from __future__ import annotations

import os
import threading

from relex import Trajectory
from relex.materialize.stream import DeltaStream


def test_read_ahead_yields_in_order_and_asks_for_each_following_tensor_in_every_file(pico, monkeypatch):
    base, run, _ = pico
    stream = DeltaStream(Trajectory.discover(base, run), 1 << 30)
    asked, lock = [], threading.Lock()

    def advise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        with lock:
            asked.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))

    monkeypatch.setattr(os, "posix_fadvise", advise)
    names = sorted(stream.base.specs)[:4]
    readers = [stream.base, *stream.readers]

    def wanted(name: str) -> set:
        return {(str(r.file_of(name).resolve()), r._where[name].offset,
                 r.specs[name].numel * r.specs[name].dtype.itemsize) for r in readers}

    seen = []
    for i, name in enumerate(stream.read_ahead(names)):
        seen.append(name)
        if i + 1 < len(names):  # the hints for the next tensor come from a background thread while this one computes
            for _ in range(500):
                with lock:
                    if wanted(names[i + 1]) <= set(asked):
                        break
                threading.Event().wait(0.01)
    assert seen == names
    assert set(asked) == set().union(*(wanted(n) for n in names[1:]))


def test_prefetch_is_a_hint_that_never_fails(pico, monkeypatch):
    base, run, _ = pico
    reader = Trajectory.discover(base, run).reader(base)
    name = next(iter(reader.specs))

    def refuse(*_):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    reader.prefetch(name)  # nothing raised: reading later works as before
    assert reader.read(name).numel() == reader.specs[name].numel
