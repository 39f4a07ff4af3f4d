"""Verified extrapolation: choose how far (target) and how much (shrink) on the user's own verifiable problems.

Candidates are every target T x shrink lambda, the model W_0 + lambda (W_pred(T) - W_0); the cutoff
checkpoint is the incumbent. The problems are split once, by a fixed seed, into a decision part, on which
the candidates race against the incumbent in rounds (paired per-problem differences; a candidate already
``drop_z`` standard errors behind the leader stops being scored), and a confirmation part that scores only
the pick. The pick is published only if its paired gain over the incumbent on the confirmation part exceeds
``margin`` standard errors: chosen on one part, judged on the other, so the choice does not inflate the gain.
"""

from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from relex.analysis.metrics import mean_stderr
from relex.errors import RelexError

if TYPE_CHECKING:
    from relex.eval.dataset import Problem
    from relex.methods.base import Method
    from relex.stats.gram import TensorStats
    from relex.trajectory import Trajectory

DEFAULT_SHRINKS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_MARGIN = 0.5  # standard errors of the confirmation gain, chosen on tuning lab runs (docs/trust.md)
NOT_VERIFIED = 3      # exit status when no candidate beat stopping on the confirmation part


@dataclass(frozen=True)
class Candidate:
    """One prediction to score: the method's W_pred at ``target``, shrunk towards the base by ``shrink``."""

    target: int
    shrink: float

    @property
    def label(self) -> str:
        return f"step {self.target} x{self.shrink:g}"


Scorer = Callable[["Candidate | None", np.ndarray], np.ndarray]
"""Right (True) or wrong per problem index, for a candidate or (None) the incumbent."""


def split_problems(n: int, seed: int = 0, confirm_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(decision, confirmation) indices: a seeded permutation of ``n`` problems cut once, never overlapping."""
    if not 0 < confirm_share < 1:
        raise RelexError(f"--verify-share {confirm_share}: give the confirmation part's share, between 0 and 1")
    if n < 4:
        raise RelexError(f"--verify needs at least 4 problems to split into decision and confirmation parts (got {n})")
    order = np.random.default_rng(seed).permutation(n)
    size = min(n - 2, max(2, round(n * confirm_share)))
    return np.sort(order[size:]), np.sort(order[:size])


@dataclass
class Race:
    """The decision part's outcomes: per candidate the problems scored so far, and the round it was dropped in."""

    incumbent: np.ndarray
    outcomes: dict[Candidate, np.ndarray]
    dropped: dict[Candidate, int] = field(default_factory=dict)

    def versus_incumbent(self, c: Candidate) -> tuple[float, float]:
        """Paired mean difference (candidate - incumbent) and its SE on the problems the candidate saw."""
        got = self.outcomes[c]
        return mean_stderr(got.astype(float) - self.incumbent[:len(got)])

    def pick(self) -> Candidate:
        """The best fully scored candidate by paired gain; ties go to the nearer, less extrapolated one."""
        finished = [c for c in self.outcomes if c not in self.dropped]
        return max(finished, key=lambda c: (self.versus_incumbent(c)[0], -c.shrink * c.target, -c.target))


def race(candidates: Sequence[Candidate], score: Scorer, decision: np.ndarray, rounds: int = 3,
         drop_z: float = 3.0, progress: Callable[[int], None] | None = None) -> Race:
    """Score the decision part in ``rounds`` chunks; after each but the last, drop the candidates whose paired
    difference to the leader is below zero by more than ``drop_z`` SEs (the cost: a few full evaluations)."""
    chunks = [c for c in np.array_split(decision, max(1, min(rounds, len(decision)))) if len(c)]
    result = Race(np.empty(0), {c: np.empty(0, dtype=bool) for c in candidates})
    alive = list(candidates)
    for r, chunk in enumerate(chunks, start=1):
        result.incumbent = np.concatenate([result.incumbent, score(None, chunk).astype(float)])
        for c in alive:
            result.outcomes[c] = np.concatenate([result.outcomes[c], score(c, chunk)])
        if progress:
            progress(len(chunk) * (len(alive) + 1))
        if r == len(chunks):
            break
        leader = max(alive, key=lambda c: result.outcomes[c].mean())
        for c in alive:
            diff, se = mean_stderr(result.outcomes[c].astype(float) - result.outcomes[leader])
            if c != leader and diff + drop_z * (se if math.isfinite(se) else math.inf) < 0:
                result.dropped[c] = r
        alive = [c for c in alive if c not in result.dropped]
    return result


@dataclass
class Verdict:
    """What ``verify`` decided, with every number behind it (``as_dict`` is ``verify.json``)."""

    race: Race
    pick: Candidate
    confirmation: tuple[float, float]   # paired gain of the pick over the incumbent, its SE
    incumbent_confirmation: float       # incumbent accuracy on the confirmation part
    pick_confirmation: float            # pick accuracy on the confirmation part
    margin: float
    decision_idx: np.ndarray
    confirmation_idx: np.ndarray
    seed: int

    @property
    def published(self) -> bool:
        gain, se = self.confirmation
        return gain > 0 and gain > self.margin * (se if math.isfinite(se) else math.inf)

    def summary(self) -> str:
        gain, se = self.confirmation
        verb = "beats" if self.published else "does not beat"
        return (f"{self.pick.label} {verb} stopping on the confirmation part: {100 * self.pick_confirmation:.1f}% vs "
                f"{100 * self.incumbent_confirmation:.1f}%, paired gain {100 * gain:+.1f} ± {100 * se:.1f} points "
                f"(margin {self.margin:g} SE, {len(self.confirmation_idx)} problems)")

    def rows(self) -> list[dict]:
        """One row per candidate: its decision-part numbers, and the confirmation for the pick."""
        out = []
        for c, got in self.race.outcomes.items():
            diff, se = self.race.versus_incumbent(c)
            row = {"target": c.target, "shrink": c.shrink, "decision_scored": int(len(got)),
                   "decision_accuracy": float(got.mean()), "decision_gain": diff, "decision_gain_se": se,
                   "dropped_in_round": self.race.dropped.get(c), "picked": c == self.pick}
            if c == self.pick:
                row.update(confirmation_accuracy=self.pick_confirmation, confirmation_gain=self.confirmation[0],
                           confirmation_gain_se=self.confirmation[1])
            out.append(row)
        return out

    def as_dict(self) -> dict:
        gain, se = self.confirmation
        return {"split": {"seed": self.seed, "decision": self.decision_idx.tolist(),
                          "confirmation": self.confirmation_idx.tolist()},
                "incumbent": {"decision_accuracy": float(self.race.incumbent.mean()),
                              "confirmation_accuracy": self.incumbent_confirmation},
                "candidates": self.rows(),
                "decision": {"published": self.published, "target": self.pick.target, "shrink": self.pick.shrink,
                             "gain": gain, "gain_se": se, "margin": self.margin, "summary": self.summary()}}


def verify(candidates: Sequence[Candidate], score: Scorer, n_problems: int, *, seed: int = 0,
           confirm_share: float = 0.5, margin: float = DEFAULT_MARGIN, rounds: int = 3, drop_z: float = 3.0,
           progress: Callable[[int], None] | None = None) -> Verdict:
    """Race ``candidates`` on the decision part, confirm the pick against the incumbent on the other part."""
    if not candidates:
        raise RelexError("--verify needs at least one candidate (a --target)")
    decision, confirmation = split_problems(n_problems, seed, confirm_share)
    result = race(candidates, score, decision, rounds, drop_z, progress)
    pick = result.pick()
    incumbent, got = score(None, confirmation).astype(float), score(pick, confirmation).astype(float)
    if progress:
        progress(2 * len(confirmation))
    return Verdict(result, pick, mean_stderr(got - incumbent), float(incumbent.mean()), float(got.mean()), margin,
                   decision, confirmation, seed)


def load_grader(spec: str | None) -> Callable[[str, str], bool]:
    """math-verify's strict grading, or a user's ``module:function`` taking (completion, answer) to a bool."""
    if spec is None:
        from relex.eval.grading import grade

        return grade
    module, _, name = spec.partition(":")
    try:
        fn = importlib.import_module(module)
        for attribute in name.split("."):  # a function, or a class's static method (relex.lab.tasks:Task.verify)
            fn = getattr(fn, attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RelexError(f"--grader {spec}: cannot import it as module:function ({exc})") from None
    if not callable(fn):
        raise RelexError(f"--grader {spec}: is not a function")
    return fn


class CandidateScorer:
    """Right or wrong per (candidate, problem), each decoded once: a subclass holds one model, loads a candidate's
    weights into it only when another's are there (``load``) and decodes rendered problems greedily (``complete``).
    Weights are streamed in (the probe's WeightLoader), never written to disk."""

    def __init__(self, trajectory: "Trajectory", method: "Method", stats: dict[str, "TensorStats"],
                 items: Sequence["Problem"], *, max_new_tokens: int = 512, device: str = "cpu",
                 memory_budget: str | int = "2GB", grader: str | None = None) -> None:
        try:
            import transformers

            from relex.eval.scoring import load_tokenizer
        except ImportError:
            raise RelexError("--verify runs the models: it needs the eval extra (pip install 'relex-rlvr[eval]')") \
                from None
        from relex.analysis.probe import WeightLoader
        from relex.eval.dataset import check_prompts, context_length, render_items

        self.method, self.stats, self.steps = method, stats, trajectory.steps
        self.max_new_tokens, self.grade = max_new_tokens, load_grader(grader)
        self.loader = WeightLoader(trajectory, memory_budget, device)
        transformers.utils.logging.disable_progress_bar()  # relex draws its own; its errors are one line
        try:
            self.tokenizer = load_tokenizer(trajectory.base, trajectory.checkpoints[-1].path)
        except (OSError, ValueError) as exc:
            raise RelexError(f"{trajectory.base}: cannot load the tokenizer for --verify "
                             f"({str(exc).splitlines()[0]})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.problems = render_items(list(items), self.tokenizer)
        check_prompts(self.problems, list(items), self.tokenizer, context_length(trajectory.base, None), trajectory.base)
        self.loaded: Candidate | None | str = "nothing"
        self.seen: dict[Candidate | None, dict[int, bool]] = {}

    def weights(self, c: Candidate | None) -> dict[str, np.ndarray]:
        """Per tensor, the candidate's weights on the observed deltas (the incumbent: the cutoff's alone)."""
        if c is None:
            last = np.eye(len(self.steps))[-1]
            return {name: last for name in self.stats}
        return {name: c.shrink * self.method.weights(s, [c.target])[0] for name, s in self.stats.items()}

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Put W_0 + sum_t weights[t] (W_t - W_0) into the model (``weights``: per tensor, from ``self.weights``)."""
        raise NotImplementedError

    def complete(self, problems: list["Problem"]) -> list[str]:
        """The model's greedy completion of each rendered problem, decoded to text."""
        raise NotImplementedError

    def __call__(self, c: Candidate | None, indices: np.ndarray) -> np.ndarray:
        seen = self.seen.setdefault(c, {})
        todo = [int(i) for i in indices if int(i) not in seen]
        if todo:
            if self.loaded != c:
                self.load(self.weights(c))
                self.loaded = c
            problems = [self.problems[i] for i in todo]
            for i, text, p in zip(todo, self.complete(problems), problems, strict=True):
                seen[i] = bool(self.grade(text, p.answer))
        return np.array([seen[int(i)] for i in indices], dtype=bool)


class ModelScorer(CandidateScorer):
    """Scores candidates in one loaded transformers model: greedy ``generate``, batched, with a KV cache."""

    def __init__(self, trajectory: "Trajectory", method: "Method", stats: dict[str, "TensorStats"],
                 items: Sequence["Problem"], *, max_new_tokens: int = 512, batch_size: int = 64,
                 device: str = "cpu", memory_budget: str | int = "2GB", grader: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(trajectory, method, stats, items, max_new_tokens=max_new_tokens, device=device,
                         memory_budget=memory_budget, grader=grader)
        self.batch_size = batch_size
        try:
            self.model = AutoModelForCausalLM.from_pretrained(trajectory.base, dtype="auto", local_files_only=True,
                                                              attn_implementation="eager").eval()
        except (OSError, ValueError) as exc:
            raise RelexError(f"{trajectory.base}: cannot load the base model for --verify "
                             f"({str(exc).splitlines()[0]})") from None
        self.model.to(torch.device(self.loader.device))
        self.loader.check(self.model)

    def load(self, weights: dict[str, np.ndarray]) -> None:
        self.loader.load(self.model, self.steps, weights)

    def complete(self, problems: list["Problem"]) -> list[str]:
        from relex.eval.scoring import greedy_completions

        return greedy_completions(self.model, self.tokenizer, problems, self.max_new_tokens, self.batch_size)


class VllmScorer(CandidateScorer):
    """Scores candidates in one vLLM engine built from the base folder, each candidate's weights loaded into it in
    place (``relex.eval.vllm_engine``); prompts are tokenized, and completions decoded, by ModelScorer's tokenizer.
    vLLM batches by itself: there is no batch size."""

    def __init__(self, trajectory: "Trajectory", method: "Method", stats: dict[str, "TensorStats"],
                 items: Sequence["Problem"], *, max_new_tokens: int = 512, device: str = "cpu",
                 memory_budget: str | int = "2GB", grader: str | None = None) -> None:
        from relex.eval.scoring import tokenizer_folder
        from relex.eval.vllm_engine import WeightPairs, open_engine

        super().__init__(trajectory, method, stats, items, max_new_tokens=max_new_tokens, device=device,
                         memory_budget=memory_budget, grader=grader)
        self.engine = open_engine(Path(trajectory.base), tokenizer_folder(trajectory.base,
                                                                          trajectory.checkpoints[-1].path))
        self.pairs = WeightPairs(self.loader, self.engine.dtype)  # in the engine's dtype: rounded once

    def load(self, weights: dict[str, np.ndarray]) -> None:
        self.engine.load(self.pairs(self.steps, weights))

    def complete(self, problems: list["Problem"]) -> list[str]:
        ids = self.tokenizer([p.prompt for p in problems])["input_ids"]
        return self.tokenizer.batch_decode(self.engine.generate(ids, self.max_new_tokens), skip_special_tokens=True)


def plot_verdict(verdict: Verdict, path: Path) -> None:
    """Decision-part accuracy against target, one line per shrink, the incumbent as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shrink in sorted({c.shrink for c in verdict.race.outcomes}):
        points = sorted((c.target, float(got.mean())) for c, got in verdict.race.outcomes.items() if c.shrink == shrink)
        ax.plot(*zip(*points), marker="o", label=f"shrink {shrink:g}")
    ax.axhline(float(verdict.race.incumbent.mean()), color="black", linestyle="--", label="stop (cutoff)")
    ax.set_xlabel("target step")
    ax.set_ylabel("accuracy, decision part")
    ax.set_title("verified extrapolation: " + ("published " + verdict.pick.label if verdict.published else "none"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict_table(verdict: Verdict):
    """The candidates as a rich table: decision-part accuracy and paired gain, the pick's confirmation."""
    from rich.table import Table

    table = Table(title=f"verified extrapolation (stop: {100 * verdict.race.incumbent.mean():.1f}% on the decision "
                        f"part, {len(verdict.decision_idx)} problems)")
    for name in ("target", "shrink", "scored", "accuracy", "gain vs stop", "confirmation gain"):
        table.add_column(name, justify="right")
    for row in verdict.rows():
        dropped = f" (dropped, round {row['dropped_in_round']})" if row["dropped_in_round"] else ""
        confirm = (f"{100 * row['confirmation_gain']:+.1f} ± {100 * row['confirmation_gain_se']:.1f}"
                   if row["picked"] else "")
        table.add_row(str(row["target"]), f"{row['shrink']:g}", f"{row['decision_scored']}{dropped}",
                      f"{100 * row['decision_accuracy']:.1f}%",
                      f"{100 * row['decision_gain']:+.1f} ± {100 * row['decision_gain_se']:.1f}", confirm)
    return table


@dataclass
class VerifyOptions:
    """``--verify``'s settings: the problems file, the shrink grid, the split and the decision's margin."""

    dataset: Path
    shrinks: Sequence[float] = DEFAULT_SHRINKS
    margin: float = DEFAULT_MARGIN
    seed: int = 0
    confirm_share: float = 0.5
    max_new_tokens: int = 512
    batch_size: int = 64
    grader: str | None = None
    record: Path | None = None  # verify.json's copy wherever the user wants it, published or not
    backend: str = "hf"  # hf: ModelScorer; vllm: VllmScorer (one engine, weights reloaded in place)


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """``--verify`` and its settings, shared by ``extrapolate`` and ``watch``."""
    g = p.add_argument_group("verified extrapolation", f"score every --target x --shrink against the cutoff "
                             f"checkpoint on your problems; write the best only if it beats stopping on a held-apart "
                             f"part (else write nothing and exit {NOT_VERIFIED}); docs/trust.md")
    g.add_argument("--verify", type=Path, metavar="FILE.jsonl",
                   help="verifiable problems, lines {\"prompt\", \"answer\"} as `relex eval --dataset` reads them")
    g.add_argument("--verify-margin", type=float, default=DEFAULT_MARGIN,
                   help="paired standard errors by which the pick must beat stopping on the confirmation part "
                        "(default %(default)s)")
    g.add_argument("--verify-share", type=float, default=0.5,
                   help="share of the problems kept apart to confirm the pick (default %(default)s)")
    g.add_argument("--verify-seed", type=int, default=0, help="seed of the one split (default %(default)s)")
    g.add_argument("--verify-json", type=Path, metavar="FILE", help="also write the verdict here, published or not")
    g.add_argument("--max-new-tokens", type=int, default=512, help="greedy tokens per answer (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="problems decoded together (default %(default)s)")
    g.add_argument("--grader", metavar="MODULE:FUNCTION",
                   help="grade with your function (completion, answer) -> bool instead of math-verify's")
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf", type=_backend,
                   help="score candidates in transformers (default) or in one vLLM engine whose weights are "
                        "reloaded in place for each (needs vllm with a CUDA GPU, or vLLM's CPU build)")


def _backend(name: str) -> str:
    """argparse type of ``--backend``: vllm is refused before any work where the package, or a CUDA GPU for its GPU
    build, is missing."""
    if name == "vllm":
        from relex.eval.dataset import check_backend

        try:
            check_backend(name)
        except RelexError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("--backend ")) from None
    return name


def verify_options(args: argparse.Namespace, shrinks: Sequence[float] | None = None) -> VerifyOptions | None:
    """The parsed ``--verify`` settings (None without ``--verify``); ``shrinks`` default to the grid."""
    if args.verify is None:
        if args.backend != "hf":
            raise RelexError(f"--backend {args.backend} chooses how --verify scores its candidates: pass --verify")
        return None
    if not math.isfinite(args.verify_margin) or args.verify_margin < 0:
        raise RelexError(f"--verify-margin {args.verify_margin}: give a finite number of standard errors, at least 0")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise RelexError("--max-new-tokens and --batch-size must be at least 1")
    return VerifyOptions(args.verify, tuple(shrinks or DEFAULT_SHRINKS), args.verify_margin, args.verify_seed,
                         args.verify_share, args.max_new_tokens, args.batch_size, args.grader, args.verify_json,
                         args.backend)


def verified_extrapolate(method: "Method", targets: Sequence[int], out_dir: Path, options: VerifyOptions, *,
                         engine: dict, stats: dict[str, "TensorStats"] | None = None, progress: bool = True,
                         **write) -> tuple[Verdict, list[Path]]:
    """Score every target x shrink of a fitted method against its cutoff checkpoint on ``options.dataset`` and
    write the pick to ``out_dir/step-T`` (``verify.json`` and ``verify.png`` inside) only if it is confirmed; ``engine``
    and ``write`` are ``extrapolate``'s options (``stats``: the observed window's, when already computed). Returns the verdict and the folders written (none if refused)."""
    from tqdm.auto import tqdm

    from relex.jsonout import dumps_strict
    from relex.eval.dataset import read_dataset
    from relex.materialize import compute_stats, extrapolate
    from relex.methods.base import DirectMethod
    from relex.tempfiles import building

    if isinstance(method, DirectMethod):
        raise RelexError(f"--verify streams weighted sums of the checkpoints into one model; --method {method.name} "
                         "predicts directly: write its outputs, then compare them with `relex eval`")
    for shrink in options.shrinks:
        if not (math.isfinite(shrink) and shrink > 0):
            raise RelexError(f"--shrink {shrink}: give positive, finite factors")
    items = read_dataset(options.dataset)
    trajectory = method.trajectory_
    method.check_targets(targets, trajectory.steps)
    stats = stats or compute_stats(trajectory, **engine, progress=progress)
    common = {"max_new_tokens": options.max_new_tokens, "device": engine.get("device", "cpu"),
              "memory_budget": engine.get("memory_budget", "2GB"), "grader": options.grader}
    scorer = (VllmScorer(trajectory, method, stats, items, **common) if options.backend == "vllm" else
              ModelScorer(trajectory, method, stats, items, batch_size=options.batch_size, **common))
    candidates = [Candidate(int(t), float(s)) for t in sorted(set(targets)) for s in dict.fromkeys(options.shrinks)]
    worst = len(items) * (len(candidates) + 1) + len(items)
    with tqdm(total=worst, desc=f"verify {len(candidates)} candidates", unit="answer", disable=not progress) as bar:
        verdict = verify(candidates, scorer, len(items), seed=options.seed, confirm_share=options.confirm_share,
                         margin=options.margin, progress=bar.update)
    record = dumps_strict(verdict.as_dict(), indent=2) + "\n"
    if options.record is not None:
        with building(Path(options.record), overwrite=True, folder=False) as tmp:
            tmp.write_text(record)
    if not verdict.published:
        return verdict, []
    method.shrink = verdict.pick.shrink
    folders = extrapolate(method, out_dir, [verdict.pick.target], stats=stats, progress=progress, **engine,
                          **{**write, "run_info": {**write.get("run_info", {}), "verify": verdict.as_dict()}})
    for folder in folders:  # beside relex.json (which holds the same record): the table and its plot
        with building(folder / "verify.json", overwrite=True, folder=False) as tmp:
            tmp.write_text(record)
        plot_verdict(verdict, folder / "verify.png")
    return verdict, folders
