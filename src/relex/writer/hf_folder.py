"""A complete Hugging Face model folder, built under a temporary name and renamed when complete.

It holds config.json (dtype set), the base's generation config and tokenizer files copied byte for
byte, the weights (one file or shards plus index) and ``relex.json`` describing how it was made.
An interrupted run leaves only a hidden ``.NAME.relex-tmp-*`` folder, never one that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.writer.safetensors_writer import PlannedTensor, ShardedWriter, plan_shards

log = logging.getLogger(__name__)

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_output_free(folder: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if folder.exists() and not overwrite:
        raise RelexError(f"{folder}: output exists; pass --overwrite to replace it")


def warn_if_no_tokenizer(base: Path) -> None:
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; outputs will have none either", base)


class ModelFolderWriter:
    """Writes one output model folder; ``commit`` publishes it, ``abort`` removes every trace."""

    def __init__(self, folder: Path, base: Path, config: dict, tensors: list[PlannedTensor],
                 max_shard_size: int) -> None:
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(f".{self.folder.name}.relex-tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        for name in COPIED_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, self.tmp / name)
        config = dict(config)
        config["dtype"] = _dominant_dtype(tensors)
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.shards = plan_shards(tensors, max_shard_size)
        self.weights = ShardedWriter(self.tmp, self.shards)

    @property
    def order(self) -> list[str]:
        """Tensor names in the order their bytes must be written."""
        return [t.name for shard in self.shards for t in shard]

    def commit(self, meta: dict, overwrite: bool) -> None:
        self.weights.close()
        (self.tmp / "relex.json").write_text(json.dumps(meta, indent=2) + "\n")
        if self.folder.exists():
            check_output_free(self.folder, overwrite)
            trash = self.folder.with_name(f".{self.folder.name}.relex-old-{os.getpid()}")
            os.replace(self.folder, trash)
            os.replace(self.tmp, self.folder)
            shutil.rmtree(trash)
        else:
            os.replace(self.tmp, self.folder)

    def abort(self) -> None:
        self.weights.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _dominant_dtype(tensors: list[PlannedTensor]) -> str:
    """The floating dtype holding most bytes: what ``config.json`` declares for the model."""
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.dtype.is_floating_point:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return dtype_name(max(sizes, key=sizes.get)) if sizes else "float32"
