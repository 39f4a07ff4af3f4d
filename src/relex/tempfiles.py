"""Hidden temporaries named after their process, and the sweep that removes those of dead processes.

Every file or folder relex builds before publishing is named ``.NAME.relex-tmp-PID`` (an output being
written) or ``.NAME.relex-old-PID`` (an output being replaced); a process killed by SIGKILL cannot
clean up, so the next run in the same folder sweeps the temporaries whose PID is no longer alive.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from relex.errors import RelexError

log = logging.getLogger(__name__)

_TEMP = re.compile(r"\.(?P<name>.+)\.relex-(?P<kind>tmp|old)-(?P<pid>\d+)")


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """The hidden temporary of ``path`` for this process (``kind``: tmp while building, old while replacing)."""
    return path.with_name(f".{path.name}.relex-{kind}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Remove a file or a folder tree, whichever ``path`` is; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(folder: Path) -> None:
    """Remove the temporaries in ``folder`` left by dead processes.

    A replaced output (``relex-old``) whose new version never arrived is put back instead: a run
    killed between the two renames of a replacement must not lose the output it was replacing.
    """
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if not match or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        final = entry.with_name(match["name"])
        if match["kind"] == "old" and not final.exists():
            log.warning("restoring %s, left aside by a process that died while replacing it", final)
            os.replace(entry, final)
            continue
        log.info("removing %s, left by a process that died", entry)
        remove(entry)


def refuse_overlap(out: Path, **inputs: Path | None) -> None:
    """Refuse an output folder (one that is built and replaced whole) that is, or holds, one of the
    inputs (``run=``, ``base=``, a checkpoint ...), before anything is touched: replacing it would
    destroy what the command reads. An output inside an input (``--out RUN``'s ``step-T/``) is allowed."""
    target = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target or source.is_relative_to(target):
            raise RelexError(f"{out}: would replace {path} (--{flag.replace('_', '-')}); "
                             f"choose an output folder that holds none of the inputs")
