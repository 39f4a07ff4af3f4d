"""relex inside a TRL run: ``GRPOTrainer(..., callbacks=[RelexCallback(targets=[1000], every=5)])``.

After each save the callback takes the new checkpoint (the same `relex.live.Watcher` as ``relex watch``,
with no settle time: the trainer calls ``on_save`` once the checkpoint and its ``trainer_state.json``
are written), logs the diagnostics through the trainer's own ``log`` (so they reach wandb, tensorboard
or whatever ``report_to`` names, under ``relex/...``) and rewrites the predictions at ``targets`` in
``out`` every ``every`` checkpoints. Any ``transformers.Trainer`` works; only the main process watches.

``verify=FILE.jsonl`` (or a ``relex.verify.VerifyOptions``): predictions are rewritten, and the jump made,
only when a candidate (the target x a shrink grid) beats the newest checkpoint on those problems, on a part
kept apart from the one that chose it (``relex extrapolate --verify``, docs/trust.md).

``jump_to=STEP`` (opt-in, single process, full weights only) replaces the model's weights with the
prediction at STEP once, at the first save at or after ``jump_at`` (without ``jump_at``: the first save
whose backtest's safe horizon reaches STEP), and training goes on from there as step STEP: the step
counter, the checkpoint names and the learning-rate schedule move to STEP, so the run ends at
``max_steps`` having trained STEP - (jump step) fewer steps. The optimizer's moments are kept as they
were (``optimizer="keep"``: Adam's m and v describe the gradients of the pre-jump model) or cleared
(``optimizer="reset"``: Adam restarts, bias correction included, on the first post-jump step). After a
jump the trajectory is no longer one run, so the callback stops watching.

A monitoring callback never stops the training it watches: a failure of its own work after the
arguments are checked (``out`` unwritable, disk full, a checkpoint it cannot read) is warned about
once, and training goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from relex.errors import RelexError
from relex.live.watcher import Watcher
from relex.tempfiles import building, refuse_overlap
from relex.trajectory.reader import weight_files
from relex.verify import VerifyOptions

log = logging.getLogger(__name__)

OPTIMIZER_CHOICES = ("keep", "reset")


def _calling_trainer() -> Trainer | None:
    """The Trainer whose callback handler is calling us (transformers hands callbacks no reference to it)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def metrics_of(status: dict) -> dict[str, float]:
    """A watcher's status as flat ``relex/...`` numbers for the trainer's loggers (None left out)."""
    out: dict[str, float] = {"relex/checkpoints": status["checkpoints_taken"], "relex/window": len(status["window"])}
    out.update({f"relex/{k}": v for k, v in status.get("median", {}).items()})
    for key in ("growth_exponent", "idle_steps", "safe_horizon", "safe_step"):
        if status.get(key) is not None:
            out[f"relex/{key}"] = status[key]
    return out


class RelexCallback(TrainerCallback):
    """Watch the run from inside the trainer; optionally jump ahead to an extrapolated step once.

    ``out`` defaults to ``OUTPUT_DIR/relex``; ``base`` (the model training started from) defaults to the
    model as it is when training begins, saved to ``out/base`` — give it when resuming a run or training
    a PEFT adapter. ``window``, ``cache``, ``memory_budget`` and ``device`` are as in ``relex watch``.
    """

    def __init__(self, targets: Sequence[int] = (), every: int = 1, out: str | Path | None = None,
                 base: str | Path | None = None, window: int | None = None, jump_to: int | None = None,
                 jump_at: int | None = None, optimizer: str = "keep", cache: str | Path | bool | None = None,
                 memory_budget: str | int = "2GB", device: str = "cpu", overwrite: bool = False,
                 verify: "str | Path | VerifyOptions | None" = None) -> None:
        if optimizer not in OPTIMIZER_CHOICES:
            raise RelexError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZER_CHOICES)}")
        if jump_at is not None and (jump_to is None or jump_at >= jump_to):
            raise RelexError(f"jump_at={jump_at} needs a jump_to beyond it (jump_to={jump_to})")
        self.targets, self.every, self.window = list(targets), every, window
        self.out, self.base = out, base
        self.jump_to, self.jump_at, self.optimizer = jump_to, jump_at, optimizer
        if verify is not None and not isinstance(verify, VerifyOptions):
            verify = VerifyOptions(Path(verify))
        self.options = {"cache": cache, "memory_budget": memory_budget, "device": device, "overwrite": overwrite,
                        "verify": verify}
        self.watcher: Watcher | None = None
        self.trainer: Trainer | None = None
        self.history: list[dict] = []  # (step, metrics) of every status logged
        self.jumped: dict | None = None
        self.failed = False  # a failure of the callback's own work was warned about

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.jump_to is not None and args.world_size > 1:
            raise RelexError("RelexCallback(jump_to=...) runs in a single process only")
        if not state.is_world_process_zero:
            return
        out = Path(self.out) if self.out is not None else Path(args.output_dir) / "relex"
        self.trainer = _calling_trainer()
        try:
            base = Path(self.base) if self.base is not None else self._save_base(
                model, processing_class, out / "base", Path(args.output_dir), state.global_step)
            self.watcher = Watcher(base, args.output_dir, self.targets, out, every=self.every, settle=0.0,
                                   window=self.window, **self.options)
        except RelexError:  # the arguments do not fit this run: said before training starts
            raise
        except Exception as exc:
            self._carry_on(exc)

    def _save_base(self, model, processing_class, folder: Path, run: Path, step: int) -> Path:
        """The model as training begins, saved (atomically) as the trajectory's base."""
        refuse_overlap(folder, run=run)
        if step > 0:
            raise RelexError(f"training resumed at step {step}: pass RelexCallback(base=...) the model it started from")
        if hasattr(model, "peft_config"):
            raise RelexError("a PEFT model: pass RelexCallback(base=...) the base model folder")
        if folder.exists() and not self.options["overwrite"]:
            raise RelexError(f"{folder}: output exists; pass RelexCallback(overwrite=True) to replace it")
        with building(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)
        return folder

    def _carry_on(self, exc: Exception) -> None:
        """Warn about a failure of the callback's own work, the first time only; training goes on either way."""
        if not self.failed:
            log.warning("relex: %s; training goes on (this warning is shown once)", exc)
        else:
            log.debug("relex: %s", exc)
        self.failed = True

    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.watcher is None:
            return
        try:
            self._take_checkpoint(state)
            if self.jump_to is not None and self.jumped is None and self._jump_due(state.global_step):
                self._jump(state, model, optimizer, lr_scheduler)
        except Exception as exc:  # a monitoring callback never stops the training it watches
            self._carry_on(exc)

    def _take_checkpoint(self, state) -> None:
        """Take the checkpoint just saved and log the new status through the trainer's loggers."""
        if self.watcher.poll() and self.watcher.status is not None:
            metrics = metrics_of(self.watcher.status)
            self.history.append({"step": state.global_step, **metrics})
            if self.trainer is not None:
                Trainer.log(self.trainer, dict(metrics))  # Trainer's own: leaves TRL's accumulated metrics alone
            else:
                log.info("relex at step %d: %s", state.global_step, metrics)

    def _jump_due(self, step: int) -> bool:
        if step >= self.jump_to:
            return False
        if self.jump_at is not None:
            return step >= self.jump_at
        safe = (self.watcher.status or {}).get("safe_step")
        return safe is not None and safe >= self.jump_to

    def _jump(self, state, model, optimizer, lr_scheduler) -> None:
        """Load the prediction at ``jump_to`` into the model in place and move the run's step to it; whatever
        can fail (writing, reading, matching the model) comes before the model is touched."""
        folders = self.watcher.write([self.jump_to])
        if not folders:  # verify=: the prediction did not beat the checkpoint just saved; try at the next save
            log.info("no jump at step %d: the prediction at step %d is not verified", state.global_step, self.jump_to)
            return
        folder = folders[0]
        weights: dict[str, torch.Tensor] = {}
        for file in weight_files(folder):
            weights.update(load_file(str(file)))
        model = getattr(model, "module", model)
        expected = set(model.state_dict())
        missing = {k for k in expected - weights.keys() if not k.endswith("lm_head.weight")}  # tied to the embedding
        unexpected = sorted(weights.keys() - expected)
        if missing or unexpected:
            raise RelexError(f"{folder}: does not match the model being trained (missing {sorted(missing)[:3]}, "
                             f"unexpected {unexpected[:3]})")
        with torch.no_grad():
            model.load_state_dict(weights, strict=False)  # copies into the parameters: the optimizer's stay
        if self.optimizer == "reset" and optimizer is not None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    optimizer.state.pop(param, None)
        skipped = self.jump_to - state.global_step
        if lr_scheduler is not None:
            for _ in range(skipped):
                lr_scheduler.step()
        self.jumped = {"from": state.global_step, "to": self.jump_to, "optimizer": self.optimizer,
                       "folder": str(folder)}
        log.info("jumped from step %d to the prediction at step %d (optimizer moments: %s)", state.global_step,
                 self.jump_to, self.optimizer)
        state.global_step = self.jump_to
        if self.trainer is not None:
            Trainer.log(self.trainer, {"relex/jumped_from": self.jumped["from"], "relex/jumped_to": self.jump_to})
        self.watcher = None
