"""The fused CPU kernels (materialize/kernels.py) against a float64 reference, and against torch's path byte for
byte."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from relex.materialize.rounding import round_once
from relex.materialize.stream import Block, _chunk_columns, fused_kernels

kernels = pytest.importorskip("relex.materialize.kernels", reason="numba is not installed")
STORED = [torch.bfloat16, torch.float16]
OUTPUTS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def rows_of(dtype: torch.dtype, n_steps: int, numel: int, seed: int = 0) -> torch.Tensor:
    """Base and n_steps checkpoints ((T+1) x numel) of a drifting tensor, stored in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(numel, generator=gen, dtype=torch.float64)
    steps = [base + 1e-3 * (t + 1) * torch.randn(numel, generator=gen, dtype=torch.float64) for t in range(n_steps)]
    return torch.stack([base, *steps]).to(dtype)


def block_of(rows: torch.Tensor, fused: bool, workers: int = 1) -> Block:
    """A CPU block over ``rows`` with ``workers`` scratches, on the fused kernels or torch's."""
    n_steps = rows.shape[0] - 1
    columns = max(1, min(_chunk_columns(n_steps), rows.shape[1]))
    scratches = [torch.empty(n_steps + 1, columns, dtype=torch.float64) for _ in range(workers)]
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    return Block(rows, False, rows[0], torch.device("cpu"), scratches, pool, kernels if fused else None)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to 1e-12 of the largest entry (entries near 0 after cancellation differ by ulps of the sum)."""
    assert got.shape == want.shape
    assert np.abs(got - want).max(initial=0.0) <= 1e-12 * np.abs(want).max(initial=0.0)


def reference(rows: torch.Tensor, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and weighted sums of the exact float64 deltas, by numpy."""
    values = rows.double().numpy()
    deltas = values[1:] - values[0]
    return deltas @ deltas.T, weights @ deltas + values[0]


@pytest.mark.parametrize("dtype", STORED)
@pytest.mark.parametrize("n_steps,numel", [(2, 0), (2, 1), (1, 1), (2, 37), (75, 300), (8, 70_001)])
def test_fused_matches_float64_reference(dtype, n_steps, numel):
    rows = rows_of(dtype, n_steps, numel)
    weights = np.linspace(-0.5, 2.0, 2 * n_steps).reshape(2, n_steps)
    gram, sums = reference(rows, weights)
    block = block_of(rows, fused=True)
    assert block.kernels is kernels
    got = block.gram().numpy()
    assert got.shape == (n_steps, n_steps) and np.allclose(got, got.T, rtol=0, atol=0)
    assert_close(got, gram)
    outs = [torch.empty(numel, dtype=torch.float64) for _ in range(2)]
    block.weighted_sums(weights, outs)
    assert_close(torch.stack(outs).numpy(), sums.reshape(2, numel))


@pytest.mark.parametrize("dtype", STORED)
@pytest.mark.parametrize("out_dtype", OUTPUTS)
@pytest.mark.parametrize("n_steps", [2, 75])
def test_fused_and_torch_write_the_same_bytes(dtype, out_dtype, n_steps):
    rows = rows_of(dtype, n_steps, 5_003, seed=n_steps)
    weights = np.linspace(-1.0, 3.0, n_steps)[None, :]
    fused, plain = block_of(rows, fused=True), block_of(rows, fused=False)
    out_fused, out_plain = torch.empty(5_003, dtype=out_dtype), torch.empty(5_003, dtype=out_dtype)
    fused.weighted_sums(weights, [out_fused])
    plain.weighted_sums(weights, [out_plain])
    assert torch.equal(out_fused.view(torch.uint8), out_plain.view(torch.uint8))
    assert_close(fused.gram().numpy(), plain.gram().numpy())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_once_is_round_once_on_hard_values(out_dtype):
    """Ties and near-ties of the output dtype held in float64, overflow, subnormals and Inf: the fused rounding
    writes ``round_once``'s bytes (NaN as a NaN)."""
    info = torch.finfo(out_dtype)
    gen = torch.Generator().manual_seed(1)
    grid = torch.randn(4000, generator=gen, dtype=torch.float64).to(out_dtype).double()
    ulp = torch.nextafter(grid.to(out_dtype).float(), torch.tensor(float("inf"))).double() - grid
    ties = grid + ulp / 2
    special = torch.tensor([0.0, info.max, -info.max, info.max * 1.0001, info.max * 2, info.tiny, info.tiny / 3,
                            info.tiny * 2 ** -20, 1e-300, -1e-300, 1e300, float("inf"), -float("inf")],
                           dtype=torch.float64)
    values = torch.cat([ties, ties + 1e-3 * ulp * 2 ** -20, ties - ulp * 2 ** -30, grid, special])
    # weighted sums with weight 1 over a zero base reproduce ``values`` exactly, then round them once
    rows = torch.stack([torch.zeros_like(values), values]).double()
    out = torch.empty(values.numel(), dtype=out_dtype)
    kernels.sums_span(rows.numpy(), np.ones(1), kernels.raw(out), 0, values.numel())
    expect = round_once(values, out_dtype)
    assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8))
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    kernels.sums_span(torch.stack([nan * 0, nan]).numpy(), np.ones(1), kernels.raw(out), 0, 1)
    assert out[0].isnan()


@pytest.mark.parametrize("dtype", STORED)
def test_results_do_not_depend_on_the_thread_count(dtype):
    rows = rows_of(dtype, 8, 200_001)
    weights = np.linspace(0.5, 2.0, 8)[None, :]
    results = []
    for workers in (1, 2, 3):
        block = block_of(rows, fused=True, workers=workers)
        out = torch.empty(200_001, dtype=dtype)
        block.weighted_sums(weights, [out])
        results.append((block.gram().numpy().tobytes(), out.view(torch.uint8).numpy().tobytes()))
    assert len(block.spans) > 3 and results[0] == results[1] == results[2]


def test_float32_rows_and_adapter_deltas_take_torchs_path():
    rows = rows_of(torch.float32, 2, 10)
    assert block_of(rows, fused=True).kernels is None
    assert Block(rows, True, rows[0], torch.device("cpu"), [torch.empty(3, 10, dtype=torch.float64)],
                 kernels=kernels).kernels is None


def test_torch_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("RELEX_KERNELS", "torch")
    assert fused_kernels() is None
    monkeypatch.delenv("RELEX_KERNELS")
    assert fused_kernels() is kernels
