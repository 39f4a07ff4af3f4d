"""NExt (Chen et al., 2026, arXiv 2604.11446): a learned, nonlinear predictor of rank-1 update factors.

For every observed step t and every trained tensor, the rank-1 factors (u, s, v) of the global delta
W_t - W_0 and of the local delta W_t - W_prev (the previous observed checkpoint) are the inputs; the
factors of the k-step-ahead delta W_{t+k} - W_t are the label. One small MLP per factor group (the u's
of length m, the v's of length n, the s's; a 1-D tensor's raw delta vector is its own factor) is
trained on every (t, t+k) pair of observed steps, with L1 loss and AdamW under a cosine schedule.
The prediction from the last observed checkpoint c is W_c + ((T - c) / k) * s u v^T (u, v renormalized):
the original's scale coefficient on the predicted delta, taken from the target step.

Differences from the public code, each deliberate:
- factor signs are fixed (u.u_ref + v.v_ref >= 0 against the tensor's last global factors): the original
  keeps whatever signs the SVD returns, so a factor and its label can disagree in sign at random;
- groups are (role, length), not length alone: the original mixes unit u's, unit v's and raw 1-D
  deltas of the same length in one MLP; each group's inputs and labels are scaled by their RMS;
- optional step input (``step_input``): t / c joins the combining layer (the original has none);
- defaults lr 1e-3 with 1000 full-batch steps (the original: 2e-5), chosen before any measurement
  because its widths (256) and step count are the same and inputs here are standardized.

Not a weighted sum of deltas: a ``DirectMethod``. ``fit`` reads every checkpoint of every tensor to learn: a
tensor's deltas once into one stack when it fits the memory budget, else row blocks of at most two checkpoints
at every visit (``relex.methods.triplet`` finds the factors one visit of the rows per iteration; a LoRA run's
from the adapters' factors, without forming a delta); the writing pass reads the last checkpoint again, a row
block at a time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.memory import release_freed_memory
from relex.methods.base import DirectMethod, RankOnePrediction, option
from relex.methods.triplet import DeltaDifference, RowBlockMatrix, Triplet, top_singular_triplet
from relex.trajectory import BufferPool, TensorDeltas, Trajectory
from relex.units import format_size

log = logging.getLogger(__name__)


def default_horizon(steps: Sequence[int]) -> int:
    """The observed step difference closest to a third of the window that has at least two (t, t+k) pairs."""
    steps = sorted(steps)
    have = set(steps)
    gaps = sorted({b - a for i, a in enumerate(steps) for b in steps[i + 1:]})
    usable = [k for k in gaps if sum(s + k in have for s in steps) >= 2]
    if not usable:
        usable = [k for k in gaps if any(s + k in have for s in steps)]
    if not usable:
        raise RelexError(f"next needs at least two observed checkpoints; observed steps {steps}")
    third = (steps[-1] - steps[0]) / 3
    return min(usable, key=lambda k: (abs(k - third), -k))


def rank1(d: torch.Tensor | RowBlockMatrix, reference: Triplet | None = None) -> Triplet:
    """Top singular triplet of a 2-D float64 matrix, its sign fixed against ``reference`` (or v's largest entry)."""
    u, s, v, converged = top_singular_triplet(d)
    if not converged:
        log.warning("next: top singular vector of a %s delta did not converge", tuple(d.shape))
    if reference is not None:
        flip = float(u @ reference[0] + v @ reference[2]) < 0
    else:
        flip = s > 0 and float(v[int(torch.argmax(v.abs()))]) < 0
    return (-u, s, -v) if flip else (u, s, v)


class _Predictor(torch.nn.Module):
    """Global and local branches (dim -> hidden -> dim), then a combiner (2 dim [+ step] -> hidden -> dim)."""

    def __init__(self, dim: int, hidden: int, step_input: bool) -> None:
        super().__init__()
        self.global_branch = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                                 torch.nn.Linear(hidden, dim))
        self.local_branch = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                                torch.nn.Linear(hidden, dim))
        self.combine = torch.nn.Sequential(torch.nn.Linear(2 * dim + step_input, hidden), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden, dim))
        self.step_input = step_input

    def forward(self, x_global: torch.Tensor, x_local: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        parts = [self.global_branch(x_global), self.local_branch(x_local)]
        if self.step_input:
            parts.append(step[:, None])
        return self.combine(torch.cat(parts, dim=1))


def predictor_parameters(dim: int, hidden: int, step_input: bool) -> int:
    """Parameters of ``_Predictor(dim, hidden, step_input)``, counted without building it."""
    return 7 * dim * hidden + step_input * hidden + 3 * hidden + 3 * dim


@dataclass
class _Group:
    """Training samples and prediction inputs of one (role, length) factor group."""

    x_global: list[torch.Tensor] = field(default_factory=list)
    x_local: list[torch.Tensor] = field(default_factory=list)
    label: list[torch.Tensor] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    query_global: list[torch.Tensor] = field(default_factory=list)
    query_local: list[torch.Tensor] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)  # tensor of each query row


def _rms(rows: list[torch.Tensor]) -> float:
    value = float(torch.stack(rows).pow(2).mean().sqrt())
    return value if value > 0 else 1.0


def train_group(group: _Group, hidden: int, step_input: bool, epochs: int, lr: float, seed: int
                ) -> tuple[torch.Tensor, float]:
    """Fit one predictor on a group's samples; returns its predictions for the query rows and the final loss.

    On torch's threads (``--threads``): a 1536-wide group of 180 samples trains 2.3x faster on two quiet cores
    than on one, and 1.4x slower when the other core is busy (measured), as the rest of relex."""
    scales = [_rms(group.x_global), _rms(group.x_local), _rms(group.label)]
    x_g, x_l, y = (torch.stack(rows).float() / scale for rows, scale in
                   zip((group.x_global, group.x_local, group.label), scales))
    steps = torch.tensor(group.step, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Predictor(y.shape[1], hidden, step_input)
    # fused: one pass over the weights a step, 2x faster on the 75M weights of a 49152-long factor group
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.1 * lr)
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = (model(x_g, x_l, steps) - y).abs().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        q_g = torch.stack(group.query_global).float() / scales[0]
        q_l = torch.stack(group.query_local).float() / scales[1]
        pred = model(q_g, q_l, torch.ones(len(q_g))) * scales[2]
    return pred.double(), float(loss.detach())


@dataclass(eq=False, kw_only=True)
class NExt(DirectMethod):
    """Rank-1 factors of global and local deltas -> MLP per factor group -> factors of the k-step delta."""

    name = "next"

    horizon: int | None = option(None, "next: steps ahead the predictor learns (default: the observed step gap "
                                       "closest to a third of the window)", type=int, metavar="K")
    step_input: bool = option(False, "next: also give the predictor the step t / cutoff (the original does not)")
    epochs: int = option(1000, "next: full-batch AdamW steps (default %(default)s)", type=int)
    lr: float = option(1e-3, "next: AdamW learning rate (default %(default)s)", type=float)
    hidden: int = option(256)  # width of every layer, as the original; no flag
    seed: int = option(0, "next: predictor initialization seed (default %(default)s)", type=int)

    def __post_init__(self) -> None:
        if self.horizon is not None and self.horizon <= 0:
            raise RelexError(f"next horizon {self.horizon} must be a positive number of steps")
        if self.epochs <= 0 or self.lr <= 0 or self.hidden <= 0:
            raise RelexError("next epochs, lr and hidden must be positive")

    def params(self) -> dict[str, Any]:
        """The parameters, with the horizon fit chose when none was given."""
        return {**super().params(), "horizon": getattr(self, "horizon_", self.horizon)}

    def check_targets(self, targets: Sequence[int], observed_steps: Sequence[int]) -> None:
        super().check_targets(targets, observed_steps)
        last = max(observed_steps)
        early = [t for t in targets if t < last]
        if early:
            raise RelexError(f"next predicts forward from the last observed step {last}; "
                             f"target {early[0]} is before it")

    # -- learning ---------------------------------------------------------------------------------
    def fit(self, trajectory: Trajectory, progress: bool = True,
            memory_budget: MemoryBudget | str | int = "2GB") -> "NExt":
        """Read every trained tensor's deltas, collect its factors, train one predictor per group."""
        super().fit(trajectory, progress, memory_budget)
        budget, buffers = MemoryBudget.of(memory_budget), BufferPool()
        steps = self.trajectory_.steps
        self.horizon_ = self.horizon or default_horizon(steps)
        pairs = [(i, steps.index(s + self.horizon_)) for i, s in enumerate(steps) if s + self.horizon_ in steps]
        if not pairs:
            raise RelexError(f"next --next-horizon {self.horizon_}: no two observed steps are {self.horizon_} apart "
                             f"(observed {steps})")
        positions = [s / steps[-1] for s in steps]  # the step input: t / c
        groups: dict[tuple[str, int], _Group] = defaultdict(_Group)
        names = [n for n, s in self.specs_.items() if s.dtype.is_floating_point and s.numel > 1]
        for name in tqdm(names, desc="next: factors", disable=not progress, leave=False):
            deltas = self.trajectory_.deltas(name, budget.total, buffers).stacked()
            if len(self.specs_[name].shape) == 1:
                stack = torch.stack([deltas.whole(t).reshape(-1) for t in range(len(steps))])
                self._collect_vector(groups, name, stack, pairs, positions)
            else:
                self._collect_matrix(groups, name, deltas, pairs, positions)
            release_freed_memory()
        self.predicted_: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self.losses_: dict[str, float] = {}
        for (role, dim), group in tqdm(sorted(groups.items()), desc="next: predictors", disable=not progress,
                                       leave=False):
            self._warn_beyond_budget(role, dim, budget)
            pred, loss = train_group(group, self.hidden, self.step_input, self.epochs, self.lr, self.seed)
            self.losses_[f"{role}:{dim}"] = loss
            for owner, row in zip(group.owners, pred):
                self.predicted_[owner][role] = row
        log.info("next: horizon %d, %d pairs, %d groups, final L1 losses %s", self.horizon_, len(pairs),
                 len(groups), self.losses_)
        return self

    def _warn_beyond_budget(self, role: str, dim: int, budget: MemoryBudget) -> None:
        """Say when a predictor's training state (float32 weights, gradients, AdamW's two moments) exceeds the
        budget: it is the method's own (the original's width, for a factor ``dim`` long), which the budget does not
        bound (1.4 GB for SmolLM2's 49152-long embedding factors: 16 bytes x 88M parameters)."""
        params = predictor_parameters(dim, self.hidden, self.step_input)
        need = 16 * params
        if budget.total and need > budget.total:
            log.warning("next: the %s-factor predictor for length %d trains %s parameters, %s of weights, gradients "
                        "and AdamW state beyond --memory-budget %s (the method's own width; the budget bounds the "
                        "deltas read)", role, dim, f"{params:,}", format_size(need), format_size(budget.total))

    def _collect_vector(self, groups, name: str, stack: torch.Tensor, pairs: list[tuple[int, int]],
                        positions: list[float]) -> None:
        """A 1-D tensor (T x n stack, small): its raw global, local and k-step deltas are the factor."""
        if not bool(torch.any(stack != 0)):
            return  # untouched by training
        local = torch.diff(stack, dim=0, prepend=torch.zeros_like(stack[:1]))
        group = groups[("vector", stack.shape[1])]
        for i, j in pairs:
            group.x_global.append(stack[i].clone())
            group.x_local.append(local[i].clone())
            group.label.append(stack[j] - stack[i])
            group.step.append(positions[i])
        group.query_global.append(stack[-1].clone())
        group.query_local.append(local[-1].clone())
        group.owners.append(name)

    def _collect_matrix(self, groups, name: str, deltas: TensorDeltas, pairs: list[tuple[int, int]],
                        positions: list[float]) -> None:
        """A matrix: the sign-fixed rank-1 factors of every global, local and k-step delta (rows x row_numel).

        Each triplet visits the stack in memory, or else the rows of at most two checkpoints, once per iteration;
        deltas stored as factors (LoRA) give their triplets without any visit.
        """
        count = len(deltas)
        reference = rank1(DeltaDifference(deltas, count - 1))
        global_ = [rank1(DeltaDifference(deltas, t), reference) for t in range(count)]
        local = [rank1(DeltaDifference(deltas, t, t - 1 if t else None), reference) for t in range(count)]
        if all(s == 0 for _, s, _ in global_):
            return  # untouched by training (e.g. outside a LoRA's target modules)
        labels = {(i, j): rank1(DeltaDifference(deltas, j, i), reference) for i, j in pairs}
        m, n = deltas.shape
        for role, index, dim in (("u", 0, m), ("s", 1, 1), ("v", 2, n)):
            group = groups[(role, dim)]

            def part(triplet: Triplet) -> torch.Tensor:
                return torch.tensor([triplet[1]], dtype=torch.float64) if index == 1 else triplet[index]

            for i, j in pairs:
                group.x_global.append(part(global_[i]))
                group.x_local.append(part(local[i]))
                group.label.append(part(labels[(i, j)]))
                group.step.append(positions[i])
            group.query_global.append(part(global_[-1]))
            group.query_local.append(part(local[-1]))
            group.owners.append(name)

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, name: str, deltas: TensorDeltas, steps: np.ndarray,
                targets: Sequence[float]) -> RankOnePrediction:
        """W_c + ((T - c) / k) times the predicted k-step delta (rank 1; a vector's own), W_c where none is."""
        last = len(deltas) - 1
        factors = self.predicted_.get(name)
        if not factors:
            return RankOnePrediction(anchor=last)
        scales = torch.tensor([(float(t) - float(steps[-1])) / self.horizon_ for t in targets], dtype=torch.float64)
        if "vector" in factors:
            return RankOnePrediction(anchor=last, left=scales[:, None] * factors["vector"][None, :],
                                     right=torch.ones(1, dtype=torch.float64))
        u, v = factors["u"], factors["v"]
        u, v = u / u.norm().clamp_min(1e-30), v / v.norm().clamp_min(1e-30)
        return RankOnePrediction(anchor=last, left=scales[:, None] * (factors["s"][0] * u)[None, :], right=v)
