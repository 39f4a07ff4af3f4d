"""Property tests of the math on random trajectories: invariants that must hold for any input."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import numpy_relex
from relex.methods import Reconstruct, Relex, TwoPoint
from relex.methods.triplet import low_rank_triplet
from relex.stats import TensorStats, gram_of


@st.composite
def trajectories(draw, min_t: int = 2, max_t: int = 8):
    """Distinct increasing steps and a T x d delta matrix with a drift plus noise."""
    t = draw(st.integers(min_t, max_t))
    d = draw(st.integers(1, 40))
    steps = sorted(draw(st.lists(st.integers(1, 500), min_size=t, max_size=t, unique=True)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    noise = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
    direction = rng.standard_normal(d)
    m = np.outer(0.01 * np.array(steps) + rng.standard_normal(), direction) + noise * rng.standard_normal((t, d))
    return np.array(steps, dtype=np.float64), m


def stats_of(steps: np.ndarray, m: np.ndarray) -> TensorStats:
    return TensorStats(steps, gram_of(torch.from_numpy(m)).numpy())


@settings(max_examples=60, deadline=None)
@given(trajectories())
def test_full_rank_reconstruction_reproduces_the_checkpoints(traj):
    steps, m = traj
    m = m.astype(np.float32).astype(np.float64)  # the engine reads fp32 deltas
    weights = Reconstruct(rank=len(steps)).weights(stats_of(steps, m), steps)
    np.testing.assert_allclose(weights @ m, m, atol=1e-6 * max(np.abs(m).max(), 1e-12))


@settings(max_examples=60, deadline=None)
@given(trajectories(), st.randoms(use_true_random=False))
def test_result_is_invariant_to_checkpoint_order(traj, rnd):
    steps, m = traj
    perm = list(range(len(steps)))
    rnd.shuffle(perm)
    for method in (Relex(rank=1), Relex(rank=2)):
        a = method.weights(stats_of(steps, m), [700.0]) @ m
        b = method.weights(stats_of(steps[perm], m[perm]), [700.0]) @ m[perm]
        np.testing.assert_allclose(a, b, atol=1e-9 * max(np.abs(a).max(), 1.0))


@settings(max_examples=60, deadline=None)
@given(trajectories(min_t=3))
def test_gram_route_equals_full_svd(traj):
    steps, m = traj
    m = m.astype(np.float32).astype(np.float64)
    s = np.linalg.svd(m, compute_uv=False)
    assume(s[0] > 0 and (len(s) == 1 or s[1] <= 0.5 * s[0]))  # a top direction needs a spectral gap
    pred = Relex().weights(stats_of(steps, m), [1000.0])[0] @ m
    w0 = {"w": torch.zeros(m.shape[1], dtype=torch.float64)}
    ckpts = {int(t): {"w": torch.from_numpy(row)} for t, row in zip(steps, m)}
    ref = numpy_relex(w0, ckpts, [int(t) for t in steps], 1000.0)["w"]
    np.testing.assert_allclose(pred, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@settings(max_examples=40, deadline=None)
@given(trajectories())
def test_deterministic_sign_and_zero_deltas(traj):
    steps, m = traj
    values, vectors = stats_of(steps, m).spectrum()
    if values[0] > 0:
        assert vectors[-1, 0] > 0 or abs(vectors[-1, 0]) < 1e-9
    zero = Relex(rank=3).weights(stats_of(steps, np.zeros_like(m)), [10.0, 20.0])
    assert not zero.any()


@given(st.lists(st.integers(1, 100), min_size=2, max_size=6, unique=True), st.integers(101, 1000))
def test_two_point_weights_are_the_step_ratio(steps, target):
    steps = sorted(steps)
    weights = TwoPoint().weights(TensorStats(np.array(steps, float), np.eye(len(steps))), [target])[0]
    assert weights[-1] == target / steps[-1] and not weights[:-1].any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 16), st.integers(0, 2**31 - 1))
def test_low_rank_triplet_is_the_products_top_singular_triplet(m, n, r, seed):
    """Any rank (0, below, above min(m, n)): s, and s u v^T, equal the full SVD's of left @ right."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(m, r, generator=gen, dtype=torch.float64)
    right = torch.randn(r, n, generator=gen, dtype=torch.float64)
    u, s, v, converged = low_rank_triplet(left, right)
    ref_u, ref_s, ref_vt = np.linalg.svd((left @ right).numpy())
    assert converged and u.shape == (m,) and v.shape == (n,)
    if r == 0:
        assert s == 0.0 and not u.any() and not v.any()
        return
    scale = max(ref_s[0], 1e-300)
    assert abs(s - ref_s[0]) <= 1e-12 * scale
    assert abs(float(u.norm()) - 1) <= 1e-12 and abs(float(v.norm()) - 1) <= 1e-12
    if len(ref_s) == 1 or ref_s[0] - ref_s[1] > 1e-6 * ref_s[0]:  # a unique top pair: the same rank-1 term
        np.testing.assert_allclose(np.outer(u.numpy(), v.numpy()) * s, np.outer(ref_u[:, 0], ref_vt[0]) * ref_s[0],
                                   atol=1e-9 * scale)
