"""Verified extrapolation: the split, the race and the decision, on outcomes whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from relex.errors import RelexError
from relex.verify import Candidate, race, split_problems, verify


@pytest.mark.parametrize("n, share", [(4, 0.5), (9, 0.3), (200, 0.5), (1000, 0.9)])
def test_split_parts_never_overlap_and_cover_everything(n, share):
    decision, confirmation = split_problems(n, seed=7, confirm_share=share)
    assert len(decision) >= 2 and len(confirmation) >= 2
    assert not set(decision) & set(confirmation)
    assert sorted([*decision, *confirmation]) == list(range(n))
    again = split_problems(n, seed=7, confirm_share=share)
    assert np.array_equal(decision, again[0]) and np.array_equal(confirmation, again[1])


def test_split_refuses_too_few_problems_and_a_bad_share():
    with pytest.raises(RelexError, match="at least 4"):
        split_problems(3)
    with pytest.raises(RelexError, match="between 0 and 1"):
        split_problems(100, confirm_share=1.0)


def table_scorer(truth: dict[Candidate | None, np.ndarray], calls: list | None = None):
    """A scorer reading fixed per-problem outcomes (the incumbent under None)."""
    def score(c, idx):
        if calls is not None:
            calls.append((c, len(idx)))
        return truth[c][idx]
    return score


def outcomes(rng, n, p):
    return rng.random(n) < p


def test_race_drops_the_clearly_worse_and_picks_the_best():
    rng = np.random.default_rng(0)
    n = 600
    incumbent = outcomes(rng, n, 0.4)
    good, bad, same = Candidate(40, 0.5), Candidate(80, 1.0), Candidate(40, 0.25)
    truth = {None: incumbent, good: incumbent | outcomes(rng, n, 0.3), bad: outcomes(rng, n, 0.05), same: incumbent}
    calls = []
    result = race([good, bad, same], table_scorer(truth, calls), np.arange(n), rounds=3)
    assert result.dropped.get(bad) == 1 and good not in result.dropped
    assert result.pick() == good
    scored = {c: sum(k for cc, k in calls if cc == c) for c in truth}
    assert scored[bad] == 200 and scored[good] == n  # the dropped one costs one round, not the whole part


def test_verify_publishes_a_real_gain_and_refuses_noise():
    rng = np.random.default_rng(1)
    n = 400
    incumbent = outcomes(rng, n, 0.5)
    better = Candidate(30, 1.0)
    truth = {None: incumbent, better: incumbent | outcomes(rng, n, 0.4)}
    verdict = verify([better], table_scorer(truth), n, seed=3)
    assert verdict.published and verdict.pick == better
    gain, se = verdict.confirmation
    assert gain > 0.1 and se > 0

    # candidates that are the incumbent with a few problems flipped either way: none is a real gain
    flips = {Candidate(t, s): incumbent ^ outcomes(np.random.default_rng(t), n, 0.02)
             for t in (20, 30) for s in (0.5, 1.0)}
    verdict = verify(list(flips), table_scorer({None: incumbent, **flips}), n, seed=3, margin=2.0)
    assert not verdict.published


def test_verdict_json_has_every_candidate_and_disjoint_parts():
    rng = np.random.default_rng(2)
    n = 50
    cands = [Candidate(t, s) for t in (10, 20) for s in (0.5, 1.0)]
    truth = {None: outcomes(rng, n, 0.5), **{c: outcomes(rng, n, 0.5) for c in cands}}
    doc = verify(cands, table_scorer(truth), n).as_dict()
    assert len(doc["candidates"]) == 4 and sum(r["picked"] for r in doc["candidates"]) == 1
    assert not set(doc["split"]["decision"]) & set(doc["split"]["confirmation"])
    assert doc["decision"]["published"] == (doc["decision"]["gain"] > doc["decision"]["margin"] * doc["decision"]["gain_se"])
