"""A complete Hugging Face model folder, built under a temporary name and renamed when complete.

It holds config.json (dtype set), the base's generation config and tokenizer files copied byte for
byte, the custom-code modules ``auto_map`` names, the weights (one file or shards plus index) and
``relex.json`` describing how it was made. Everything is fsynced before the rename. An interrupted
run leaves only a hidden ``.NAME.relex-tmp-PID`` folder, never one that looks finished, and the next
run sweeps it once that process is dead.
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
    """The base's ``*.py`` modules that ``auto_map`` names (``modeling_x.Class`` or ``repo--modeling_x.Class``)."""
    refs = []
    for value in (config.get("auto_map") or {}).values():
        refs.extend(value if isinstance(value, list) else [value])
    modules = {ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs if isinstance(ref, str) and "." in ref}
    return sorted(f"{m}.py" for m in modules if (base / f"{m}.py").is_file())


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
        with os_errors(self.folder):
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            sweep(self.folder.parent)
            remove(self.tmp)
            self.tmp.mkdir()
            for name in (*COPIED_FILES, *custom_code_files(base, config)):
                if (base / name).is_file():
                    shutil.copyfile(base / name, self.tmp / name)
            config = dict(config)
            config["dtype"] = _dominant_dtype(tensors)
            if "torch_dtype" in config:
                config["torch_dtype"] = config["dtype"]
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.shards = plan_shards(tensors, max_shard_size)
        self.weights = ShardedWriter(self.tmp, self.shards, self.folder)

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
