"""Score model folders with a user's evaluator: a command that prints a number for ``{model}``.

The lab's ``relex eval {model} --profile default --score-only`` is one; any script that loads the folder
and prints its accuracy as the last line of its output is another.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from relex.errors import RelexError


def run_evaluator(command: str, model: Path) -> float:
    """Run ``command`` with ``{model}`` replaced by the folder; its last output line is the score."""
    if "{model}" not in command:
        raise RelexError(f"--eval-command {command!r} must contain {{model}} where the model folder goes")
    argv = [part.replace("{model}", str(model)) for part in shlex.split(command)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RelexError(f"--eval-command {argv[0]}: cannot run ({exc})") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RelexError(f"--eval-command failed on {model} (exit {done.returncode}): {tail}")
    try:
        return float(lines[-1].split()[0])
    except ValueError:
        raise RelexError(f"--eval-command printed {lines[-1]!r} last on {model}: expected a number") from None
