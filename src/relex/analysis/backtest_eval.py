"""Accuracy in the backtest: materialize each prefix's prediction of the last observed checkpoint and score it.

Weight errors come from the Gram alone; accuracy needs the model, so each evaluated prediction is
written (through the one streaming engine, re-using cached statistics) to a scratch folder and scored
with the same evaluator as the real checkpoint. The scratch, a whole model, is named as relex names its
temporaries (``$TMPDIR/.relex-backtest.relex-tmp-PLACE-PID``), so a killed run's is swept by the next.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from relex.analysis.backtest import default_settings
from relex.analysis.scoring import run_evaluator
from relex.materialize import extrapolate
from relex.tempfiles import remove, sweep, temp_path
from relex.trajectory import Trajectory


def score_backtest(trajectory: Trajectory, rows: list[dict], labels: list[str], command: str,
                   cache, progress: bool = False) -> dict:
    """Add ``accuracy`` to the rows of ``labels`` and return the real checkpoint's score."""
    final = trajectory.checkpoints[-1]
    real = run_evaluator(command, final.path)
    settings = {s.label: s for s in default_settings()}
    scratch = temp_path(Path(tempfile.gettempdir()) / "relex-backtest")
    sweep(scratch.parent)
    remove(scratch)
    scratch.mkdir(mode=0o700)  # private, as mkdtemp made it
    try:
        for row in rows:
            if row["setting"] not in labels:
                continue
            prefix = [s for s in trajectory.steps if s <= row["prefix_end"]]
            method = settings[row["setting"]].build(prefix)
            method.cutoff = row["prefix_end"]
            [folder] = extrapolate(method.fit(trajectory), scratch / "model", [final.step], overwrite=True, cache=cache,
                                   progress=progress)
            row["accuracy"] = run_evaluator(command, folder)
            row["accuracy_real"] = real
    finally:
        remove(scratch)
    return {"step": final.step, "accuracy": real}
