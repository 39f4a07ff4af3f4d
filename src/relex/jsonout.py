"""Strict JSON out: non-finite floats become null, so every file relex writes parses with any JSON parser.

``json.dumps`` writes NaN and Infinity (not JSON) and never passes floats to ``default=``, so the
values are replaced before dumping, and ``allow_nan=False`` makes any that slip through an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from relex.errors import RelexError


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None, numpy scalars made Python."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite_or_none(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps_strict(value: Any, **options: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite floats as null and ``allow_nan=False``."""
    return json.dumps(finite_or_none(value), allow_nan=False, default=str, **options)


def write_json(path: Path, value: Any) -> None:
    """Strict JSON of ``value``, indented, to ``path``; a path that cannot be written is a one-line error."""
    try:
        Path(path).write_text(dumps_strict(value, indent=2) + "\n")
    except OSError as exc:
        raise RelexError(f"{path}: cannot write ({exc.strerror or exc})") from None
