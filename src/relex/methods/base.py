"""The method interface: a method turns one tensor's statistics into weights on its observed deltas.

Every weight-space method here predicts W_T = W_0 + sum_t A[T, t] (W_t - W_0): only the weights A
differ, so all methods share one streaming materializer and one writer (``relex.materialize``).
The estimator shape follows scikit-learn: parameters in the constructor, ``fit`` on a trajectory,
then ``weights`` for any targets; ``relex.materialize.extrapolate(method, out_dir, targets)`` writes them.
Methods never import the materializer: it reads methods, so the dependency runs one way.
"""

from __future__ import annotations

import argparse
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.stats.gram import TensorStats
from relex.trajectory import TensorDeltas, TensorSpec, Trajectory

log = logging.getLogger(__name__)

SHARED_FLAG_DEFAULTS = {"rank": 1, "anchor": 0}  # the shared flags' CLI defaults


def option(default: Any = None, help: str | None = None, *, flag: str | None = None, shared: bool = False,
           parse: Callable[[Any], Any] | None = None, **argparse_kwargs: Any) -> Any:
    """A method parameter, declared once: its default, and how the command line sets it.

    With ``help`` it has a flag of its own, ``--{method name}-{parameter}`` unless ``flag`` names it, whose
    default is the parameter's (a bool gives a switch: store_true, or --no-... when on by default) and whose
    value ``parse`` turns into the parameter's. ``shared``: the CLI's flag of the same name sets it (--cutoff,
    --rank, --anchor). Neither: no flag (the Python API only).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "shared": shared, "parse": parse,
                                            "argparse": argparse_kwargs})


@dataclass(eq=False, kw_only=True)
class Method(ABC):
    """A weight-space extrapolation (or reconstruction) method over the checkpoints up to ``cutoff``.

    Subclasses are keyword-only dataclasses whose fields (``option``) are the method's parameters: the
    command-line flags, ``from_args`` and ``params`` are derived from them; ``__post_init__`` validates.
    """

    name: ClassVar[str]
    min_checkpoints: ClassVar[int] = 2  # observed checkpoints the method needs (a line: two)

    cutoff: int | None = option(None, shared=True)
    shrink: float = option(1.0, shared=True)  # the prediction written is W_0 + shrink (W_pred - W_0)

    @abstractmethod
    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        """Weights A (len(targets) x T) so that the predicted delta at target j is sum_t A[j, t] Delta_t."""

    def shrunk_weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        """``weights`` times ``shrink``: the prediction moved towards the base W_0 (whatever the anchor)."""
        out = self.weights(stats, targets)
        return out if self.shrink == 1 else out * self.shrink

    def check_shrink(self) -> None:
        if not (math.isfinite(self.shrink) and self.shrink > 0):
            raise RelexError(f"--shrink {self.shrink}: give a positive, finite factor (1 = the method's prediction)")

    def params(self) -> dict[str, Any]:
        """Constructor parameters, recorded in each output's ``relex.json``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def _flag(cls, param: Field) -> str:
        return param.metadata["flag"] or f"--{cls.name}-{param.name.replace('_', '-')}"

    @classmethod
    def add_arguments(cls, parser: argparse._ActionsContainer) -> None:
        """Add this method's own command-line flags (shared ones: --cutoff, --rank, --anchor)."""
        for param in fields(cls):
            if param.metadata["help"] is None:
                continue
            kwargs = dict(param.metadata["argparse"])
            if isinstance(param.default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction if param.default else "store_true"
            parser.add_argument(cls._flag(param), default=param.default, help=param.metadata["help"], **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Method":
        """Build the method from parsed command-line flags."""
        values = {}
        for param in fields(cls):
            if param.metadata["shared"]:
                values[param.name] = getattr(args, param.name, param.default)
            elif param.metadata["help"] is not None:
                value = getattr(args, cls._flag(param).removeprefix("--").replace("-", "_"), param.default)
                parse = param.metadata["parse"]
                values[param.name] = parse(value) if parse and value is not None else value
        return cls(**values)

    @classmethod
    def warn_ignored(cls, args: argparse.Namespace) -> None:
        """Warn about a shared flag (--rank, --anchor) set away from its default that this method never reads."""
        reads = {param.name for param in fields(cls) if param.metadata["shared"]}
        for flag, default in SHARED_FLAG_DEFAULTS.items():
            value = getattr(args, flag, default)
            if flag not in reads and value != default:
                log.warning("--%s %s is ignored by --method %s", flag, value, cls.name)

    def check_targets(self, targets: Sequence[int], observed_steps: Sequence[int]) -> None:
        """Refuse targets the method cannot produce (all methods: target must be positive)."""
        for target in targets:
            if target <= 0:
                raise RelexError(f"target {target} must be a positive step")

    # -- estimator API ---------------------------------------------------------------------------
    def fit(self, trajectory: Trajectory, progress: bool = True,
            memory_budget: MemoryBudget | str | int = "2GB") -> "Method":
        """Select the observed checkpoints (step <= cutoff) and validate them against the base.

        ``progress`` draws bars and ``memory_budget`` bounds the bytes held at a time for methods that read
        the checkpoints while fitting (NExt).
        """
        self.check_shrink()
        self.trajectory_ = trajectory.observed(self.cutoff, self.min_checkpoints)
        self.specs_: dict[str, TensorSpec] = self.trajectory_.tensor_specs()
        return self


@dataclass(frozen=True)
class RankOnePrediction:
    """One tensor's predicted deltas at every target, as an observed delta plus a rank-1 term.

    On the tensor viewed as rows x row_numel, target j's delta is Delta_anchor (nothing when ``anchor`` is
    None: the prediction starts from W_0) plus left[j] outer right (nothing when ``left`` is None). Kept in
    factors so the writer forms it a row block at a time: no dense per-target delta of a big tensor exists.
    """

    anchor: int | None
    left: torch.Tensor | None = None   # targets x rows, float64
    right: torch.Tensor | None = None  # row_numel, float64
    scale: float = 1.0                 # the method's shrink: every term times it, in float64 before rounding

    def rows(self, j: int, start: int, stop: int, anchor_rows: torch.Tensor | None) -> torch.Tensor:
        """Target j's predicted delta on rows start:stop, float64 (stop - start) x row_numel.

        ``anchor_rows`` are Delta_anchor's rows start:stop (unused, may be None, when ``anchor`` is None).
        """
        if self.left is None:
            return anchor_rows * self.scale
        term = self.left[j, start:stop, None] * self.right[None, :]
        if self.anchor is not None:
            term.add_(anchor_rows)
        return term if self.scale == 1 else term.mul_(self.scale)


@dataclass(eq=False, kw_only=True)
class DirectMethod(Method):
    """A method whose prediction is not a weighted sum of observed deltas (e.g. AlphaRL's per-step SVDs).

    It sees one tensor's deltas through ``relex.trajectory.TensorDeltas``, row blocks that fit the memory
    budget (the whole tensor in one block when it fits), and predicts in rank-1 factors, so its memory is
    bounded by the budget whatever the tensor's size.
    """

    def weights(self, stats: TensorStats, targets: Sequence[float]) -> np.ndarray:
        raise TypeError(f"{self.name} predicts deltas directly; it has no weights on observed deltas")

    @abstractmethod
    def predict(self, name: str, deltas: TensorDeltas, steps: np.ndarray,
                targets: Sequence[float]) -> RankOnePrediction:
        """Every target's predicted delta of tensor ``name``, from its observed deltas at ``steps``."""
