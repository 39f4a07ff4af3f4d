"""Buffer scopes: the streaming engine's two row readers (a block's stored rows for weighted sums, a direct method's
float64 row blocks) each fill the memory budget, so each lets the other's scope go before it reads."""

from __future__ import annotations

import torch

from relex import Trajectory
from relex.materialize.stream import DeltaStream
from relex.trajectory import BufferPool


def held(pool: BufferPool) -> set[str]:
    """The scopes that hold buffers in ``pool`` ("" for keys outside any scope)."""
    return {key.rpartition("/")[0] for key in pool._buffers}


def test_a_scope_reuses_and_releases_its_own_buffers_only():
    pool = BufferPool()
    first, second = pool.scope("first"), pool.scope("second")
    a = first.get("x", (4,))
    assert first.get("x", (2,)).data_ptr() == a.data_ptr()  # reused, not reallocated
    assert second.get("x", (4,)).data_ptr() != a.data_ptr()  # the same key in another scope is another buffer
    pool.get("x", (1,), torch.uint8)
    first.release()
    assert held(pool) == {"", "second"}
    pool.release()
    assert held(pool) == set()


def test_load_and_deltas_let_each_others_buffers_go(pico):
    base, run, _ = pico
    stream = DeltaStream(Trajectory.discover(base, run), 1 << 30)
    name = max(stream.base.specs, key=lambda n: stream.base.specs[n].numel)
    stream.load(name, 0, 1)
    assert "load" in held(stream._buffers)
    for _ in stream.deltas(name).blocks([0, 1]):
        pass
    assert "deltas" in held(stream._buffers) and "load" not in held(stream._buffers)
    stream.load(name, 0, 1)
    assert "load" in held(stream._buffers) and "deltas" not in held(stream._buffers)
