"""Hidden temporaries named after their process, the one way every output is published, and the sweep
that removes the temporaries of dead processes.

Every file or folder relex builds before publishing is named ``.NAME.relex-tmp-PLACE-PID`` (an output
being written) or ``.NAME.relex-old-PLACE-PID`` (an output being replaced). A process killed by SIGKILL
cannot clean up, so the next run in the same folder sweeps the temporaries whose process is dead.

A PID only means something inside its own PID namespace: the same number on another machine, or in
another container of this one, is another process. PLACE names that namespace: the sanitized host name
(for people) and 8 hex digits hashing the host name, the kernel's boot id (different on every machine
and every boot) and the PID namespace's id (different in every container). The sweep judges only the
temporaries of its own PLACE by their PID and leaves every other one alone (one a day old or more is
logged, for a person to remove if that run is over), so a relex on another host or container writing
into a shared ``--out`` never loses its temporary. Names without a PLACE, from earlier versions, count
as this place's. Locks were not used: ``flock`` is not honoured across machines on every shared
filesystem, and a temporary file cannot hold a lock file inside it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from fnmatch import fnmatch
from pathlib import Path

from relex.errors import RelexError

log = logging.getLogger(__name__)

_TEMP = re.compile(r"\.(?P<name>.+)\.relex-(?P<kind>tmp|old)-(?:(?P<place>[A-Za-z0-9_]+\.[0-9a-f]{8})-)?(?P<pid>\d+)")
STALE_SECONDS = 24 * 3600  # another place's temporary this old is logged


@functools.cache
def place() -> str:
    """``HOST.KEY``: where this process's PID means this process (host, boot and PID namespace)."""
    host = socket.gethostname()
    ids = [host]
    with suppress(OSError):
        ids.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with suppress(OSError):
        ids.append(os.readlink("/proc/self/ns/pid"))
    key = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', host).strip('_')[:32] or 'host'}.{key}"


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """The hidden temporary of ``path`` for this process (``kind``: tmp while building, old while replacing)."""
    return path.with_name(f".{path.name}.relex-{kind}-{place()}-{os.getpid()}")


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
    """Remove the temporaries in ``folder`` left by dead processes of this place; leave other places' alone.

    A replaced output (``relex-old``) whose new version never arrived is put back instead: a run
    killed between the two renames of a replacement must not lose the output it was replacing.
    """
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if not match:
            continue
        if (match["place"] or place()) != place():
            _note_foreign(entry, match["place"])
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        final = entry.with_name(match["name"])
        if match["kind"] == "old" and not os.path.lexists(final):
            log.warning("restoring %s, left aside by a process that died while replacing it", final)
            os.replace(entry, final)
            continue
        log.info("removing %s, left by a process that died", entry)
        remove(entry)


def _note_foreign(entry: Path, where: str) -> None:
    """Log another place's temporary once it is old: its process cannot be checked from here."""
    with suppress(OSError):
        age = time.time() - entry.lstat().st_mtime
        if age >= STALE_SECONDS:
            log.warning("%s: left %.0f hours ago by relex on %s (another machine or container); remove it "
                        "by hand if that run is over", entry, age / 3600, where.split(".")[0])


def check_replaceable(final: Path, overwrite: bool, layout: Sequence[str] | None = None,
                      what: str = "relex") -> None:
    """Refuse an existing ``final`` without ``overwrite``; with ``layout`` (glob patterns of the names
    ``what`` writes, the first one a file every output holds), also a non-empty folder that holds another
    name or lacks that file: it was not written by ``what`` (a run, a home folder) and is never deleted."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    if not overwrite:
        raise RelexError(f"{final}: output exists; pass --overwrite to replace it")
    if layout is None:
        return
    if not final.is_dir() or final.is_symlink():
        raise RelexError(f"{final}: not a {what} output folder; refusing to replace it")
    names = sorted(entry.name for entry in final.iterdir())
    foreign = [n for n in names if not any(fnmatch(n, pattern) for pattern in layout)]
    if foreign or (names and layout[0] not in names):
        reason = f"it holds {foreign[0]}" if foreign else f"it has no {layout[0]}"
        raise RelexError(f"{final}: not a {what} output ({reason}); refusing to replace it, choose another --out")


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``. An existing folder is first moved aside (``relex-old``) and
    removed after: a run killed between the two renames leaves it for the sweep to put back."""
    aside = temp_path(final, "old")
    replacing = tmp.is_dir() and os.path.lexists(final)
    if replacing:
        remove(aside)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if replacing:
            os.replace(aside, final)
        raise
    if replacing:
        remove(aside)


@contextmanager
def building(final: Path, *, overwrite: bool = False, layout: Sequence[str] | None = None, what: str = "relex",
             folder: bool = True) -> Iterator[Path]:
    """Build ``final`` under its hidden temporary (a fresh folder, or a file path with ``folder=False``) and
    publish it when the block completes; on any failure remove the temporary and the parents made for it.

    ``check_replaceable(final, overwrite, layout, what)`` is applied before and again just before publishing.
    """
    final = Path(final)
    check_replaceable(final, overwrite, layout, what)
    made = [p for p in final.parents if not p.exists()]  # deepest first
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep(final.parent)
        remove(tmp)
        if folder:
            tmp.mkdir()
        yield tmp
        check_replaceable(final, overwrite, layout, what)
        publish(tmp, final)
    except BaseException:
        remove(tmp)
        for parent in made:
            with suppress(OSError):
                parent.rmdir()
        raise


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
