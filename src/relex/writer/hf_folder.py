"""A complete Hugging Face model folder, built under a temporary name and renamed when complete.

It holds config.json (dtype set), the base's generation config and tokenizer files copied byte for
byte (contents, not modes; only regular files within the base's tree), the custom-code modules
``auto_map`` names, the weights (one file or shards plus index) and ``relex.json`` describing how it
was made. Everything is fsynced before the rename. A failed or interrupted run leaves only a hidden
``.NAME.relex-tmp-PLACE-PID`` folder (``relex.tempfiles``), never one that looks finished: a failure
removes it, and the next run sweeps one of a killed process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.jsonout import dumps_strict
from relex.safeio import inside
from relex.tempfiles import remove, sweep, temp_path
from relex.writer.safetensors_writer import PlannedTensor, ShardedWriter, plan_shards

log = logging.getLogger(__name__)

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_output_free(folder: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to, and an output whose parent is not a folder."""
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise RelexError(f"{parent}: is a file, not a folder; choose another --out")
    if folder.exists() and not overwrite:
        raise RelexError(f"{folder}: output exists; pass --overwrite to replace it")


def warn_if_no_tokenizer(base: Path) -> None:
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; outputs will have none either", base)


@contextmanager
def os_errors(folder: Path, what: str = ""):
    """OS errors (disk full, read-only, a file in the way) as one-line RelexErrors naming the output."""
    try:
        yield
    except OSError as exc:
        name = Path(exc.filename).name if exc.filename else ""
        detail = f"{what or name}: " if (what or name) else ""
        raise RelexError(f"{folder}: cannot write {detail}{exc.strerror or exc}") from None


def custom_code_files(base: Path, config: dict) -> list[str]:
    """The base's ``*.py`` modules that ``auto_map`` (typed by ``Trajectory.base_config``) names, as
    ``modeling_x.Class`` or ``repo--modeling_x.Class``; one outside the base (``../evil.Class``) is refused."""
    modules = set()
    for key, value in (config.get("auto_map") or {}).items():
        for ref in value if isinstance(value, list) else [value]:
            module = ref.split("--")[-1].rpartition(".")[0] if isinstance(ref, str) else ""
            if module and inside(base, f"{module}.py", base / "config.json", f"auto_map[{key!r}]"):
                modules.add(f"{module}.py")
    return sorted(modules)


def side_files(base: Path, config: dict) -> list[str]:
    """The base's files every output carries: tokenizer and generation config, and the custom code; each a regular
    file within the base's tree (``relex.safeio.inside``: a link out of it is refused, not copied into outputs)."""
    return [name for name in COPIED_FILES if inside(base, name)] + custom_code_files(base, config)


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's entry to disk (a folder's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelFolderWriter:
    """Writes one output model folder; ``publish_all`` publishes a set of them, ``abort`` removes every trace."""

    def __init__(self, folder: Path, base: Path, config: dict, tensors: list[PlannedTensor],
                 max_shard_size: int) -> None:
        self.folder = Path(folder)
        self.tmp = temp_path(self.folder)
        self.trash = temp_path(self.folder, "old")
        self.published = False
        copied = side_files(base, config)  # a refused name or link is refused before anything is made
        with os_errors(self.folder):
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            sweep(self.folder.parent)
            remove(self.tmp)
            try:
                self._start(base, config, copied, tensors)
            except BaseException:  # disk full while copying the tokenizer ...: no temporary is left
                remove(self.tmp)
                raise
        self.shards = plan_shards(tensors, max_shard_size)
        self.weights = ShardedWriter(self.tmp, self.shards, self.folder)

    def _start(self, base: Path, config: dict, copied: list[str], tensors: list[PlannedTensor]) -> None:
        """The temporary folder with the base's side files (contents only: a 0600 file's mode is not carried
        over) and config.json, its dtype set and strict JSON (``base_config`` refused NaN and Infinity)."""
        self.tmp.mkdir()
        for name in copied:
            (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / name, self.tmp / name)
        config = dict(config)
        config["dtype"] = _dominant_dtype(tensors)
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")

    @property
    def order(self) -> list[str]:
        """Tensor names in the order their bytes must be written."""
        return [t.name for shard in self.shards for t in shard]

    def finish(self, meta: dict) -> None:
        """Complete the folder under its temporary name: last shard, index and ``relex.json``, all on disk."""
        self.weights.close()
        with os_errors(self.folder, "relex.json"):
            (self.tmp / "relex.json").write_text(dumps_strict(meta, indent=2) + "\n")
            for path in self.tmp.iterdir():
                fsync_path(path)
            fsync_path(self.tmp)

    def publish(self, overwrite: bool) -> None:
        """Rename the finished folder to its final name, moving an existing output aside first."""
        check_output_free(self.folder, overwrite)
        with os_errors(self.folder):
            if os.path.lexists(self.folder):
                os.replace(self.folder, self.trash)
            try:
                os.replace(self.tmp, self.folder)
            except BaseException:
                if os.path.lexists(self.trash):
                    os.replace(self.trash, self.folder)
                raise
        self.published = True

    def unpublish(self) -> None:
        """Undo ``publish``: the new folder back to its temporary name, the old output restored."""
        if not self.published:
            return
        os.replace(self.folder, self.tmp)
        if os.path.lexists(self.trash):
            os.replace(self.trash, self.folder)
        self.published = False

    def abort(self) -> None:
        self.weights.abort()
        remove(self.tmp)


def publish_all(writers: list[ModelFolderWriter], metas: list[dict], overwrite: bool) -> None:
    """Publish every output or none: all are finished and all targets checked before the first rename,
    and a failed rename puts back the ones already renamed."""
    for writer, meta in zip(writers, metas):
        writer.finish(meta)
    for writer in writers:
        check_output_free(writer.folder, overwrite)
    try:
        for writer in writers:
            writer.publish(overwrite)
    except BaseException:
        for writer in reversed(writers):
            writer.unpublish()
        raise
    for writer in writers:
        remove(writer.trash)
    with contextlib.suppress(OSError):
        fsync_path(writers[0].folder.parent)


def _dominant_dtype(tensors: list[PlannedTensor]) -> str:
    """The floating dtype holding most bytes: what ``config.json`` declares for the model."""
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.dtype.is_floating_point:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return dtype_name(max(sizes, key=sizes.get)) if sizes else "float32"
