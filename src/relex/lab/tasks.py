"""Prompt tasks with programmatically verifiable answers (the lab's MATH stand-in).

A task samples training problems, owns a fixed held-out set that sampling never returns, and
verifies completions; the verifier doubles as the GRPO reward.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any

from relex.eval.dataset import Problem


class Task(ABC):
    """A family of problems: training sampler, fixed held-out set, verifier.

    The held-out set depends only on the task's parameters and ``heldout_seed`` (never on the lab
    seed), so `relex eval` can rebuild exactly the same set from the command line.
    """

    name: str
    alphabet: str = "0123456789+*="

    def __init__(self, digits: int, heldout_size: int = 500, heldout_seed: int = 1234) -> None:
        if digits < 1:
            raise ValueError("digits must be >= 1")
        self.digits = digits
        self.heldout_size = heldout_size
        self.heldout_seed = heldout_seed
        self._heldout = self._build_heldout()
        self._heldout_prompts = frozenset(p.prompt for p in self._heldout)

    @abstractmethod
    def _draw(self, rng: random.Random) -> Problem:
        """Draw one problem uniformly from the task's distribution."""

    @property
    @abstractmethod
    def space_size(self) -> int:
        """Number of distinct problems; bounds the held-out size."""

    @property
    def max_answer_chars(self) -> int:
        """Longest possible answer, in characters (sets the generation budget)."""
        return self.digits + 1

    @property
    def max_new_tokens(self) -> int:
        """Generation budget in tokens: the longest answer plus its end-of-sequence token (one char, one token)."""
        return self.max_answer_chars + 1

    def _build_heldout(self) -> list[Problem]:
        if self.heldout_size > self.space_size // 2:
            raise ValueError(f"held-out size {self.heldout_size} is too large for {self.space_size} problems")
        rng = random.Random(f"{self.name}:{self.digits}:{self.heldout_seed}")
        seen: dict[str, Problem] = {}
        while len(seen) < self.heldout_size:
            p = self._draw(rng)
            seen.setdefault(p.prompt, p)
        return list(seen.values())

    @property
    def heldout(self) -> list[Problem]:
        """The fixed evaluation set; `sample` never returns one of these prompts."""
        return list(self._heldout)

    def is_heldout(self, prompt: str) -> bool:
        return prompt in self._heldout_prompts

    def sample(self, rng: random.Random) -> Problem:
        """One training problem, redrawn until it is not in the held-out set."""
        while True:
            p = self._draw(rng)
            if p.prompt not in self._heldout_prompts:
                return p

    def sample_many(self, n: int, rng: random.Random) -> list[Problem]:
        return [self.sample(rng) for _ in range(n)]

    def dataset(self, problems: list[Problem]) -> list[Problem]:
        """``problems`` as a `relex eval --dataset` file holds them (prompts as the model reads them here)."""
        return list(problems)

    @staticmethod
    def verify(completion: str, answer: str) -> bool:
        """Exact match of the completion (surrounding whitespace ignored) with the answer."""
        return completion.strip() == answer

    def reward(self, completions: list[str], answer: list[str], **_: Any) -> list[float]:
        """GRPO reward function (TRL signature): 1.0 for a verified completion, else 0.0."""
        return [1.0 if self.verify(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this task (held-out set included)."""
        return {"task": self.name, "digits": self.digits, "heldout_size": self.heldout_size,
                "heldout_seed": self.heldout_seed}


class Addition(Task):
    """``a+b=`` -> ``a+b`` with a, b uniform in [0, 10**digits), operands zero-padded to ``digits``.

    Fixed-width operands (``07+35=`` -> ``42``) keep digit positions aligned, which a tiny model needs
    to learn the algorithm in seconds on a CPU; the answer is the plain integer.
    """

    name = "addition"

    @property
    def space_size(self) -> int:
        return 10 ** (2 * self.digits)

    def _draw(self, rng: random.Random) -> Problem:
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return Problem(f"{a:0{self.digits}d}+{b:0{self.digits}d}=", str(a + b))


class Multiplication(Task):
    """``a*d=`` -> ``a*d`` with a uniform in [0, 10**digits) (zero-padded) and d a digit in [2, 9]."""

    name = "multiplication"

    @property
    def space_size(self) -> int:
        return 10**self.digits * 8

    def _draw(self, rng: random.Random) -> Problem:
        a, d = rng.randint(0, 10**self.digits - 1), rng.randint(2, 9)
        return Problem(f"{a:0{self.digits}d}*{d}=", str(a * d))


TASKS: dict[str, type[Task]] = {"addition": Addition, "multiplication": Multiplication}


def make_task(name: str, digits: int, heldout_size: int = 500, heldout_seed: int = 1234) -> Task:
    """Build a registered task by name."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
    return cls(digits=digits, heldout_size=heldout_size, heldout_seed=heldout_seed)
