"""What a model folder's own files name, read safely: paths that stay in the folder, regular files only, and
JSON objects of bounded size and depth whose keys hold the types relex reads them as.

A folder's files are input (an index's shard names, ``auto_map``'s modules, a tokenizer that is a link): a
name or link that leaves the folder, a FIFO, a device or a hostile JSON file is refused in one line naming
the file and key, before anything is opened or written.
"""

from __future__ import annotations

import json
import math
import os
import stat
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Mapping

from relex.errors import RelexError

MAX_JSON_BYTES = 64 << 20  # an index of 100K tensors is ~10 MB, a config.json a few KB
MAX_JSON_DEPTH = 32        # Hugging Face configs nest 3 or 4 levels
_SHOWN_CHARS = 60          # of a string or key quoted in a message
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (links followed); False if nothing is there. Anything else (a FIFO,
    whose read would block forever, a folder, a device, a broken link) is refused, told by ``stat``, never opened."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise RelexError(f"{path}: not a regular file (a broken link)") from None
        return False
    except OSError as exc:
        raise RelexError(f"{path}: cannot stat ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return True
    kind = next((name for is_kind, name in _KINDS if is_kind(mode)), "not a file")
    raise RelexError(f"{path}: not a regular file ({kind})")


def tree_root(folder: Path) -> Path:
    """The tree within which links in ``folder`` are followed: the folder itself, or for a Hugging Face cache
    snapshot (``models--ORG--NAME/snapshots/REV``, whose files link to ``../../blobs``) its repository folder."""
    real = Path(folder).resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def inside(folder: Path, name: str, source: Path | None = None, key: str = "") -> Path | None:
    """``folder / name`` if it is a regular file within the folder's tree, None if nothing is there.

    Refused: a name (read from ``key`` of file ``source``) that is absolute or climbs out with '..', a link
    leading out of the tree (so a private file elsewhere is never read, nor copied into an output), and
    anything that is not a regular file.
    """
    folder = Path(folder)
    parts = PurePath(name).parts
    if PurePath(name).is_absolute() or ".." in parts:
        raise RelexError(f"{source}: {key} names {_clip(name)!r}, a path outside {folder}")
    path = folder / name
    if not os.path.lexists(path):
        return None
    root = tree_root(folder)
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise RelexError(f"{path}: cannot resolve its links ({exc})") from None
    if not target.is_relative_to(root):
        raise RelexError(f"{path}: links to {target}, outside {root} (relex follows links only within the model "
                         "folder; copy the file in)")
    return path if regular_file(path) else None


def read_json_object(path: Path, shape: Mapping[str, Any] | None = None) -> dict:
    """The JSON object in side file ``path``; ``shape`` maps keys to the JSON type each must have when present,
    as a type hint (``int``, ``float`` for any number, ``dict[str, str]``, ``str | list[str | None]``, ``object``).

    Refused in one line naming the file, and the key where there is one: not a regular file, over
    MAX_JSON_BYTES (checked before reading), not JSON, nested deeper than MAX_JSON_DEPTH, not an object at
    the top, NaN or Infinity anywhere (outputs are strict JSON), a key of ``shape`` of another type.
    """
    if not regular_file(path):
        raise RelexError(f"{path}: not found")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(MAX_JSON_BYTES + 1) if size <= MAX_JSON_BYTES else b""
    except OSError as exc:
        raise RelexError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_JSON_BYTES or len(raw) > MAX_JSON_BYTES:
        raise RelexError(f"{path}: {max(size, len(raw))} bytes, more than the {MAX_JSON_BYTES} a JSON side file "
                         "may hold")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise RelexError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise RelexError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RelexError(f"{path}: top level is {_show(value)}, expected an object")
    _check_depth_and_numbers(path, value)
    for key, expected in (shape or {}).items():
        found = _mismatch(value[key], expected, _key("", key)) if key in value else None
        if found is not None:
            where, wrong, wanted = found
            raise RelexError(f"{path}: key '{where}' is {_show(wrong)}, expected {_describe(wanted)}")
    return value


def _check_depth_and_numbers(path: Path, value: dict) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and non-finite numbers, walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RelexError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels (at key '{where}')")
        if isinstance(item, float) and not math.isfinite(item):
            raise RelexError(f"{path}: key '{where}' is {_show(item)}; relex reads only finite numbers")
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack.extend((child, _key(where, k), depth + 1) for k, child in children)


def _key(where: str, key: str | int) -> str:
    """The path of ``key`` under ``where`` as messages write it: ``weight_map['model.x']``, ``auto_map['A'][1]``."""
    return repr(_clip(key))[1:-1] if not where else f"{where}[{_clip(key)!r}]"


def _mismatch(value: Any, expected: Any, where: str) -> tuple[str, Any, Any] | None:
    """(key path, value, expected type) of the deepest part of ``value`` not of its ``expected`` JSON type."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        failures = [_mismatch(value, option, where) for option in typing.get_args(expected)]
        if None in failures:
            return None
        deepest = max(failures, key=lambda failure: len(failure[0]))
        return deepest if deepest[0] != where else (where, value, expected)
    if origin in (dict, list):
        if not isinstance(value, origin):
            return where, value, expected
        element = typing.get_args(expected)[-1]
        items = value.items() if origin is dict else enumerate(value)
        return next((found for k, v in items if (found := _mismatch(v, element, _key(where, k)))), None)
    return None if _is(value, expected) else (where, value, expected)


def _is(value: Any, kind: type) -> bool:
    """JSON's types: true and false are no numbers, an integer is a number (``float``)."""
    if kind is object:
        return True
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(kind))
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true or false", type(None): "null", object: "any value"}[typing.get_origin(kind) or kind]


def _show(value: Any) -> str:
    """A JSON value as a message names it: ``a string ('4')``, ``NaN``, ``a list``."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # NaN, Infinity, -Infinity
    if isinstance(value, (int, float)):
        return f"{'an integer' if isinstance(value, int) else 'a number'} ({value})"
    if isinstance(value, str):
        return f"a string ({_clip(value)!r})"
    return "a list" if isinstance(value, list) else "an object"


def _clip(text: str | int) -> str | int:
    """A string from a file cut to what a one-line message can quote."""
    if isinstance(text, str) and len(text) > _SHOWN_CHARS:
        return text[:_SHOWN_CHARS - 3] + "..."
    return text
