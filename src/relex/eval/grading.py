"""Grading with math-verify, the grader RLVR work uses: the final answer of a completion against a reference.

A ``\\boxed{...}`` answer wins; otherwise math-verify takes the last number or expression of the text, so
``\\boxed{42}``, ``The answer is 42.`` and ``42.0`` all match ``42``. A completion with no answer scores 0.
A final answer that is sums, differences or products of plain numbers (``83 - 52``) scores 0 unless the
reference has that form too: math-verify would evaluate it, and GRPO on SmolLM2 learned to restate the
question (``83 - 52 is not allowed.``) for full reward; the answer must be stated, not left to the grader.
math-verify times each parse and comparison with ``signal.alarm``, so grading must run on the main thread.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from math_verify import parse, verify


@lru_cache(maxsize=65536)
def _gold(answer: str) -> Any:
    """The parsed reference answer (wrapped in ``$..$`` so math-verify reads it as LaTeX)."""
    text = answer.strip()
    return parse(text if text.startswith("$") or "\\boxed" in text else f"${text}$")


_NUMBER = r"\(?-?\d[\d,]*(?:\.\d+)?\)?"
# plain numbers joined by +, -, *, x, \times or \cdot: arithmetic left for the grader to do (fractions are answers)
_ARITHMETIC = re.compile(rf"{_NUMBER}(?:\s*(?:[-+*×]|\\times|\\cdot)\s*{_NUMBER})+")


def unevaluated(text: str) -> bool:
    """True if ``text`` is arithmetic on plain numbers (``83 - 52``, ``22 * 2``) rather than a stated value."""
    return _ARITHMETIC.fullmatch(text.strip().strip("$").strip()) is not None


def final_answer(completion: str, answer: str) -> tuple[bool, str | None]:
    """Plain math-verify's verdict on the completion's final answer, and that answer's text (None: none found)."""
    gold = _gold(answer)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {answer!r}")
    found = parse(completion)
    return bool(verify(gold, found)), str(found[-1]) if found else None


def grade(completion: str, answer: str) -> bool:
    """True if the completion's final answer is mathematically equal to ``answer`` and stated as a value."""
    equal, text = final_answer(completion, answer)
    return equal and not (text is not None and unevaluated(text) and not unevaluated(answer))
