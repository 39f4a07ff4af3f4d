"""Function-space backtest: does a prediction behave more like the real checkpoint than stopping does?

For each horizon h of the weight-space backtest, each setting predicts the last observed checkpoint W_C
from the prefix at C/h; stopping is the prefix's last checkpoint. The real W_C greedily continues every
probe prompt once; each predicted model and the stop are then run teacher-forced on those sequences
and compared with W_C token by token: mean KL(real || predicted) of the next-token distributions and
greedy agreement (the predicted model's argmax equals the real greedy token). A setting is safe at h
only if its per-prompt KL is below stopping's by more than ``margin`` standard errors of the paired
per-prompt difference: better than what you already have, beyond the probe's noise.

Weights are streamed like the engine: per tensor, the prefix's deltas are read in row blocks within the
memory budget and their weighted sum (computed on ``--device``) is copied into a loaded model; two model
copies live, the real checkpoint's and the candidate's. Each candidate costs one read of its prefix and two
forward passes over the probe (the real model's reference is recomputed rather than held, so memory stays
bounded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from relex.analysis.backtest import default_settings
from relex.analysis.metrics import mean_stderr
from relex.budget import MemoryBudget
from relex.errors import RelexError
from relex.eval.chat import render
from relex.materialize.engine import _check_device
from relex.materialize.stream import DeltaStream, all_finite
from relex.stats.gram import TensorStats
from relex.trajectory import Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line, or JSONL lines with a ``prompt`` field (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RelexError(f"{path}: cannot read the probe prompts ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line).get("prompt")
            except (ValueError, AttributeError, RecursionError):
                prompt = None
            if not isinstance(prompt, str):
                raise RelexError(f"{path}:{number}: a JSON line needs a string 'prompt' field")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if len(prompts) < 2:
        raise RelexError(f"{path}: the probe needs at least 2 prompts (found {len(prompts)})")
    return prompts


class WeightLoader:
    """Streams W_0 + sum_t weights[t] (W_t - W_0) into a loaded model, tensor by tensor in row blocks."""

    def __init__(self, trajectory: Trajectory, memory_budget: MemoryBudget | str | int = "2GB",
                 device: str = "cpu") -> None:
        self.trajectory = trajectory
        self.budget = MemoryBudget.of(memory_budget)
        self.device = _check_device(device)  # where the weighted sums are computed, as in the engine
        self.specs = trajectory.tensor_specs()

    def check(self, model: "PreTrainedModel") -> None:
        """Every tensor of the checkpoints must be a parameter or buffer of ``model``: name the first that is not."""
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
        missing = [n for n in self.specs if n not in names]
        if missing:
            raise RelexError(f"{self.trajectory.base}: tensor '{missing[0]}' of the checkpoints is not a parameter of "
                             f"the model transformers loads from it")

    def load(self, model: "PreTrainedModel", steps: list[int], weights: np.ndarray | dict[str, np.ndarray]) -> None:
        """Set ``model``'s weights to the weighted sum over the checkpoints at ``steps`` (``fill`` of its parameters
        and buffers by name)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(model.named_buffers())
        self.fill({name: tensor.data for name, tensor in params.items()}, steps, weights)

    @torch.no_grad()  # not inference_mode: the stream's worker threads update its buffers outside that mode
    def fill(self, tensors: Mapping[str, torch.Tensor], steps: list[int],
             weights: np.ndarray | dict[str, np.ndarray]) -> None:
        """Write the weighted sum over the checkpoints at ``steps`` (a prefix of the trajectory) into ``tensors``, by
        checkpoint name: the trained (floating) ones, each rounded once to its dtype.

        ``weights``: one vector for every tensor, or one per tensor name (as methods give them)."""
        window = self.trajectory.observed(steps[-1], minimum=1)
        if window.steps != list(steps):
            raise RelexError(f"probe: steps {steps} are not a prefix of the observed window {self.trajectory.steps}")
        stream = DeltaStream(window, self.budget, self.device, n_outputs=1)
        for name, spec in self.specs.items():
            if not spec.dtype.is_floating_point or spec.numel == 0:
                continue  # integer buffers are not trained
            target = tensors[name].view(-1)
            row = np.asarray(weights[name] if isinstance(weights, dict) else weights, dtype=np.float64)[None, :]
            for r0, r1 in stream.row_ranges(spec):
                rows = target[r0 * spec.row_numel:r1 * spec.row_numel]
                [values] = stream.load(name, r0, r1).weighted_sums(row, [rows])
                if not all_finite(values):
                    raise RelexError(f"probe: tensor '{name}' would hold Inf or NaN in a predicted checkpoint")


class Probe:
    """Probe prompts with the real checkpoint's greedy continuations, batched for teacher forcing."""

    def __init__(self, trajectory: Trajectory, prompts: Sequence[str], *, raw_prompts: bool = False,
                 max_new_tokens: int = 32, batch_size: int = 32, device: str = "cpu",
                 memory_budget: MemoryBudget | str | int = "2GB") -> None:
        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise RelexError("--probe runs the models: it needs transformers (pip install 'relex-rlvr[eval]')") from None
        transformers.utils.logging.disable_progress_bar()  # relex draws its own; its errors are one line
        transformers.utils.logging.set_verbosity_error()
        self.trajectory = trajectory
        self.loader = WeightLoader(trajectory, memory_budget, device)
        self.device = torch.device(self.loader.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(trajectory.base)
            self.real = AutoModelForCausalLM.from_pretrained(trajectory.base, dtype="auto").to(self.device).eval()
            self.model = AutoModelForCausalLM.from_pretrained(trajectory.base, dtype="auto").to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise RelexError(f"{trajectory.base}: cannot load the base model and tokenizer for --probe "
                             f"({str(exc).splitlines()[0]})") from None
        self.loader.check(self.real)
        self.tokenizer = tokenizer
        steps = trajectory.steps
        self.loader.load(self.real, steps, np.eye(len(steps))[-1])
        texts = list(prompts)
        if not raw_prompts:
            texts = [render(tokenizer, p) for p in texts]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.batches = [self._continue(tokenizer, texts[i:i + batch_size], max_new_tokens)
                        for i in range(0, len(texts), batch_size)]
        self.n_prompts = len(texts)

    @torch.inference_mode()
    def _continue(self, tokenizer, texts: list[str], max_new_tokens: int) -> dict[str, torch.Tensor]:
        """One batch: the real model's greedy continuation, masks and positions for teacher forcing."""
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        width = enc["input_ids"].shape[1]
        out = self.real.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, width:]
        scored = torch.ones_like(new, dtype=torch.bool)
        if tokenizer.eos_token_id is not None:  # score up to and including the first end of sequence
            ended = (new == tokenizer.eos_token_id).int().cumsum(-1)
            scored = (ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))
        mask = torch.cat([enc["attention_mask"], scored.long()], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": out, "attention_mask": mask, "position_ids": positions, "scored": scored,
                "width": torch.tensor(width)}

    def _logits(self, model: "PreTrainedModel", batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token log-probabilities (float32) at the positions that predict the continuation."""
        width, n_new = int(batch["width"]), batch["scored"].shape[1]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        return logits[:, width - 1:width - 1 + n_new].float().log_softmax(-1)

    @torch.inference_mode()
    def compare(self) -> tuple[np.ndarray, np.ndarray]:
        """Per prompt: mean token KL(real || model) and greedy agreement of ``self.model`` with the real model."""
        kls, agrees = [], []
        for batch in self.batches:
            ref, got = self._logits(self.real, batch), self._logits(self.model, batch)
            kl = (ref.exp() * (ref - got)).sum(-1).clamp(min=0)
            agree = (got.argmax(-1) == ref.argmax(-1)).float()
            scored = batch["scored"].float()
            count = scored.sum(-1).clamp(min=1)
            kls.append(((kl * scored).sum(-1) / count).double().cpu().numpy())
            agrees.append(((agree * scored).sum(-1) / count).double().cpu().numpy())
        return np.concatenate(kls), np.concatenate(agrees)

    def score(self, steps: list[int], weights: np.ndarray | dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt KL and agreement of the model W_0 + sum_t weights[t] Delta_t (``steps``: a prefix)."""
        self.loader.load(self.model, steps, weights)
        return self.compare()


def _prediction_weights(setting_label: str, stats: dict[str, TensorStats], prefix: list[int],
                        final: int) -> dict[str, np.ndarray]:
    """Per tensor, the setting's weights on the prefix's deltas for predicting step ``final``."""
    setting = next(s for s in default_settings() if s.label == setting_label)
    method = setting.build(prefix)
    return {name: method.weights(st.subset(prefix), [final])[0] for name, st in stats.items()}


def probe_backtest(probe: Probe, stats: dict[str, TensorStats], rows: list[dict], *, margin: float = 2.0,
                   settings: Sequence[str] | None = None, progress: bool = False) -> list[dict]:
    """One row per weight-space backtest row (of ``settings``, default all): the function-space comparison.

    ``stats`` are the window's Gram statistics (as given to ``backtest``), ``rows`` its output.
    """
    from tqdm.auto import tqdm

    wanted = [r for r in rows if settings is None or r["setting"] in settings]
    out = []
    stops: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    steps = [int(s) for s in next(iter(stats.values())).steps]
    for row in tqdm(wanted, desc="probe backtest", disable=not progress):
        prefix = [s for s in steps if s <= row["prefix_end"]]
        if row["prefix_end"] not in stops:
            stops[row["prefix_end"]] = probe.score(prefix, np.eye(len(prefix))[-1])
        kl_stop, agree_stop = stops[row["prefix_end"]]
        per_tensor = _prediction_weights(row["setting"], stats, prefix, row["target"])
        kl, agree = probe.score(prefix, per_tensor)
        kl_diff, se = mean_stderr(kl - kl_stop)
        mean_stop = float(kl_stop.mean())
        out.append({"horizon": row["horizon"], "prefix_end": row["prefix_end"], "target": row["target"],
                    "setting": row["setting"], "kl": float(kl.mean()), "kl_stop": mean_stop,
                    "kl_vs_stay": float(kl.mean()) / mean_stop if mean_stop > 0 else float("nan"),
                    "agreement": float(agree.mean()), "agreement_stop": float(agree_stop.mean()),
                    "kl_diff": kl_diff, "kl_diff_se": se, "margin": margin,
                    "safe": bool(kl_diff + margin * se < 0), "prompts": int(len(kl))})
    return out


def safe_horizon_by_probe(probe_rows: list[dict], setting: str) -> float:
    """Largest tested horizon up to which ``setting`` beat stopping on the probe beyond its noise."""
    safe = 1.0
    for row in sorted((r for r in probe_rows if r["setting"] == setting), key=lambda r: r["horizon"]):
        if not row["safe"]:
            break
        safe = row["horizon"]
    return safe


def best_supported_by_probe(probe_rows: list[dict]) -> tuple[str, float]:
    """(setting, function-space safe horizon) of the setting supported furthest; ties: lower KL there."""
    safe = {label: safe_horizon_by_probe(probe_rows, label) for label in dict.fromkeys(r["setting"] for r in probe_rows)}
    first = min(r["horizon"] for r in probe_rows)

    def kl_at(label: str) -> float:
        h = safe[label] if safe[label] > 1 else first
        row = next((r for r in probe_rows if r["setting"] == label and r["horizon"] == h), None)
        return row["kl"] if row and math.isfinite(row["kl"]) else math.inf

    label = min(safe, key=lambda lb: (-safe[lb], kl_at(lb)))
    return label, safe[label]


def run_probe(trajectory: Trajectory, stats: dict[str, TensorStats], rows: list[dict], path: Path, *,
              raw_prompts: bool = False, max_new_tokens: int = 32, margin: float = 2.0, device: str = "cpu",
              memory_budget: MemoryBudget | str | int = "2GB", progress: bool = False) -> list[dict]:
    """The function-space backtest of an observed window from a prompts file: what ``--probe FILE`` runs."""
    if not rows:
        raise RelexError(f"{len(trajectory.steps)} observed checkpoints are too few to backtest")
    probe = Probe(trajectory, read_prompts(path), raw_prompts=raw_prompts, max_new_tokens=max_new_tokens,
                  device=device, memory_budget=memory_budget)
    return probe_backtest(probe, stats, rows, margin=margin, progress=progress)
