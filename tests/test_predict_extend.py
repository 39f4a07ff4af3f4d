"""Predict-extend's pure parts: building any registered method, and reading the plain run's curve.

The loop itself runs end to end in tests/test_lab.py, on the ci lab outputs built there.
"""

from __future__ import annotations

import pytest

from relex.errors import RelexError
from relex.lab.predict_extend import build_method, first_step_reaching, steps_to_refine
from relex.methods import METHODS, TwoPoint


def test_every_registered_method_builds_with_the_window_as_cutoff() -> None:
    for name in METHODS:
        assert build_method(name, 7).cutoff == 7


def test_a_method_without_cutoff_is_built_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    class Windowless(TwoPoint):
        name = "windowless"

        def __init__(self) -> None:
            super().__init__()

    monkeypatch.setitem(METHODS, "windowless", Windowless)
    assert isinstance(build_method("windowless", 5), Windowless)


def test_unknown_or_unbuildable_methods_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RelexError, match="unknown method 'nope'"):
        build_method("nope", 4)

    class NeedsData(TwoPoint):
        name = "needs-data"

        def __init__(self, data: list[float], cutoff: int | None = None) -> None:
            super().__init__(cutoff=cutoff)

    monkeypatch.setitem(METHODS, "needs-data", NeedsData)
    with pytest.raises(RelexError, match="default parameters"):
        build_method("needs-data", 4)


def test_first_crossing_and_the_interval_to_refine() -> None:
    curve = {0: 0.30, 3: 0.40, 6: 0.55, 9: 0.50}
    assert first_step_reaching(curve, 0.20) == 0
    assert first_step_reaching(curve, 0.50) == 6
    assert first_step_reaching(curve, 0.60) is None
    assert steps_to_refine(curve, 0.50, last_step=9) == [4, 5]  # between the last scored step below and 6
    assert steps_to_refine(curve, 0.35, last_step=9) == [1, 2]
    assert steps_to_refine(curve, 0.20, last_step=9) == []  # the base already reaches it
    assert steps_to_refine(curve, 0.60, last_step=9) == []  # never reached: nothing to refine
    assert steps_to_refine({**curve, 4: 0.45}, 0.50, last_step=9) == [5]
