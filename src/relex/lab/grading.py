"""Grading with math-verify, the grader RLVR work uses: the final answer of a completion against a reference.

A ``\\boxed{...}`` answer wins; otherwise math-verify takes the last number or expression of the text, so
``\\boxed{42}``, ``The answer is 42.`` and ``42.0`` all match ``42``. A completion with no answer scores 0.
math-verify times each parse and comparison with ``signal.alarm``, so grading must run on the main thread.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from math_verify import parse, verify


@lru_cache(maxsize=65536)
def _gold(answer: str) -> Any:
    """The parsed reference answer (wrapped in ``$..$`` so math-verify reads it as LaTeX)."""
    text = answer.strip()
    return parse(text if text.startswith("$") or "\\boxed" in text else f"${text}$")


def grade(completion: str, answer: str) -> bool:
    """True if the completion's final answer is mathematically equal to ``answer``."""
    gold = _gold(answer)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {answer!r}")
    return bool(verify(gold, parse(completion)))
