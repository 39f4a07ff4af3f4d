"""AlphaRL (Cai et al., ICLR 2026, "On predictability of RL dynamics for LLMs").

Per observed checkpoint t and per 2-D weight, the top singular triplet of Delta_t = W_t - W_0 (viewed
as a matrix, rows = output features): a_t = s_t u_t, with v_t its right vector. The a_t's signs are
aligned walking back from the last step (a_t is flipped when its cosine with the already aligned
a_{t+1} is negative); a one-component PLS regression relates the aligned a_t to a scalar y (the step
number by default, or measured accuracies), a line maps the PLS score to y, and inverting it at the
target's y gives a_T. The prediction is W_T = W_0 + a_T v_cut^T with v_cut the last observed
checkpoint's right vector. The basis is re-derived at every step; that is the difference RELEX's
shared trajectory basis removes.

Not a weighted sum of observed deltas, so it is a ``DirectMethod``: it reads one checkpoint's delta at a time,
in row blocks that fit the memory budget. The triplets come from block subspace iteration in float64 (no full
SVD of any Delta_t; ``relex.methods.triplet``), warm-started from the previous checkpoint's v and stopped on the
triplet's residual ||D^T u - s v|| / s; the prediction is written a row block at a time from its factors.

Scope (as in the original, which only touches the attention and MLP matrices of the decoder layers):
2-D tensors other than the token embedding and the LM head (the 2-D tensors with a dimension equal to
the config's ``vocab_size``). Every other tensor (norms, biases, embeddings) keeps its value at the
cutoff checkpoint, W_cut, as the original's output (built on the loaded cutoff model) does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.safeio import read_json_object
from relex.methods.base import DirectMethod, RankOnePrediction, option
from relex.methods.pls import PLS1
from relex.methods.triplet import MAX_ITER, DeltaDifference, top_singular_triplet
from relex.trajectory import TensorDeltas, Trajectory

log = logging.getLogger(__name__)


def align_signs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows a_t with signs aligned from the last one back; also which rows were flipped.

    a_t is flipped when its cosine with the aligned a_{t+1} is negative. A zero row (a tensor that did
    not move at that step) has no sign: it is skipped, and the row before it compares with the next
    non-zero one, so one frozen step does not break the chain.
    """
    aligned = np.array(a, dtype=np.float64, copy=True)
    flipped = np.zeros(len(aligned), dtype=bool)
    reference = aligned[-1] if len(aligned) else None
    for t in range(len(aligned) - 2, -1, -1):
        if float(aligned[t] @ reference) < 0:
            aligned[t] = -aligned[t]
            flipped[t] = True
        if aligned[t].any():
            reference = aligned[t]
    return aligned, flipped


def load_scores(path: str | Path) -> dict[int, float]:
    """``{"STEP": accuracy, ...}`` from a JSON file, as {int step: float}.

    The ``relex report --scores`` layout, ``{"real": {"STEP": accuracy}, ...}``, is read too (its
    "real" series: the run's measured accuracies), so one file serves both commands.
    """
    path = Path(path)
    raw = read_json_object(path)
    if isinstance(raw, dict) and isinstance(raw.get("real"), dict):
        raw = raw["real"]
    if not isinstance(raw, dict):
        raise RelexError(f"{path}: expected a JSON object mapping step -> accuracy")
    try:
        scores = {int(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise RelexError(f"{path}: keys must be integer steps and values numbers") from None
    bad = [s for s, v in scores.items() if not np.isfinite(v)]
    if bad:
        raise RelexError(f"{path}: the score of step {bad[0]} is not finite")
    return scores


@dataclass(eq=False, kw_only=True)
class AlphaRL(DirectMethod):
    """Per-step rank-1 factors, PLS(1) against the step (or accuracy), inverted at the target."""

    name = "alpharl"

    target: str = option("step", "alpharl: regress the rank-1 factors on the step number (default) or on "
                                 "measured accuracies (needs --scores)", choices=["step", "accuracy"])
    scores: dict[int, float] | None = option(None, "alpharl: JSON {step: accuracy} for every observed step and "
                                                   "every --target (the target's entry is the accuracy the "
                                                   "prediction is inverted at)",
                                             flag="--scores", parse=load_scores, type=Path, metavar="FILE")
    pls_scale: bool = option(True, "alpharl: standardize the factors' coordinates in the PLS, as scikit-learn's "
                                   "default in the original (default: on)")

    def __post_init__(self) -> None:
        if self.target not in ("step", "accuracy"):
            raise RelexError(f"alpharl target {self.target!r}: choose 'step' or 'accuracy'")
        if self.target == "accuracy" and not self.scores:
            raise RelexError("alpharl --alpharl-target accuracy needs --scores FILE (JSON: step -> accuracy)")
        self.scores = {int(k): float(v) for k, v in (self.scores or {}).items()}
        self.vocab_size_: int | None = None

    def params(self) -> dict[str, Any]:
        """The parameters; the scores only when the regression reads them."""
        out = super().params()
        scores = out.pop("scores")
        if self.target == "accuracy":
            out["scores"] = {str(k): v for k, v in sorted(scores.items())}
        return out

    def fit(self, trajectory: Trajectory, progress: bool = True,
            memory_budget: MemoryBudget | str | int = "2GB") -> "AlphaRL":
        super().fit(trajectory, progress, memory_budget)
        config = self.trajectory_.base_config()
        self.vocab_size_ = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        return self

    def check_targets(self, targets: Sequence[int], observed_steps: Sequence[int]) -> None:
        super().check_targets(targets, observed_steps)
        if self.target != "accuracy":
            return
        missing = [s for s in [*observed_steps, *targets] if s not in self.scores]
        if missing:
            raise RelexError(f"alpharl --scores has no accuracy for step {missing[0]} (it needs every observed "
                             "step, and for each --target the accuracy to invert at)")
        if len({self.scores[s] for s in observed_steps}) < 2:
            raise RelexError("alpharl: the observed steps' accuracies are all equal; nothing to regress on")

    def in_scope(self, shape: tuple[int, ...]) -> bool:
        """2-D, and not the embedding or LM head (a dimension equal to the vocabulary size)."""
        return len(shape) == 2 and (self.vocab_size_ is None or self.vocab_size_ not in shape)

    def factors(self, name: str, deltas: TensorDeltas) -> tuple[np.ndarray, torch.Tensor]:
        """The a_t (T x rows, signs as found) and the last checkpoint's v, from the T deltas."""
        a = np.zeros((len(deltas), deltas.shape[0]))
        v = None
        for t in range(len(deltas)):
            u, s, v_t, converged = top_singular_triplet(DeltaDifference(deltas, t), v)
            if not converged:
                log.warning("alpharl: %s at checkpoint %d: top singular vector did not converge in %d steps",
                            name, t, MAX_ITER)
            a[t] = (u * s).cpu().numpy()
            v = v_t
        return a, v

    def predict(self, name: str, deltas: TensorDeltas, steps: np.ndarray,
                targets: Sequence[float]) -> RankOnePrediction:
        """W_0 + a_T v_cut^T in scope; the cutoff checkpoint's delta (W_cut) out of scope."""
        if not self.in_scope(deltas.tensor_shape):
            return RankOnePrediction(anchor=len(deltas) - 1)
        a, v = self.factors(name, deltas)
        aligned, _ = align_signs(a)
        if self.target == "accuracy":
            y = np.array([self.scores[int(s)] for s in steps])
            goals = [self.scores[int(t)] for t in targets]
        else:
            y, goals = np.asarray(steps, dtype=np.float64), [float(t) for t in targets]
        pls = PLS1.fit(aligned, y, scale=self.pls_scale)
        a_target = torch.from_numpy(np.stack([pls.invert(g) for g in goals])).to(v)
        return RankOnePrediction(anchor=None, left=a_target, right=v)
