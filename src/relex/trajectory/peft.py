"""PEFT LoRA adapter checkpoints read as full-weight deltas of the base model.

A run trained with a ``peft_config`` (TRL's GRPOTrainer, for one) saves ``checkpoint-N/`` with only
``adapter_config.json`` and ``adapter_model.safetensors``. For every adapted module the merged weight
is W_0 + Delta with Delta = B @ A * scale, scale = lora_alpha / r (lora_alpha / sqrt(r) with
``use_rslora``), r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern``; embeddings and
``fan_in_fan_out`` layers take the transpose, as PEFT's ``get_delta_weight`` does. ``modules_to_save``
(and biases trained with ``bias="all"``) are stored whole: their delta is the saved value minus W_0.
Every other tensor of the base has a zero delta.

``AdapterReader`` has CheckpointReader's interface (``specs``, ``files``, ``read``, ``file_of``,
``fingerprint``, ``close``, ``read_delta``, ``delta_factors``), so a trajectory mixes nothing else; its specs
are the base's (the dtype a merged model is written in). ``read_delta`` gives Delta itself in float64,
computed from the adapter's factors: the streaming engine takes that, never ``(W_0 + Delta) - W_0`` rounded
in between.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors import SafetensorError, safe_open

from relex.errors import RelexError
from relex.safeio import read_json_object, regular_file
from relex.trajectory.reader import ADAPTER_CONFIG, ADAPTER_WEIGHTS, file_fingerprint

if TYPE_CHECKING:
    from relex.trajectory.reader import CheckpointReader, TensorSpec

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<param>weight|bias))?")
# Options whose merge is not W_0 + B @ A * scale: refused rather than merged wrongly.
_UNSUPPORTED = ("use_dora", "use_bdlora", "target_parameters", "trainable_token_indices", "layer_replication",
                "kasa_config", "monteclora_config")
# The keys read from adapter_config.json and the JSON type each must have (float: any number).
_CONFIG_SHAPE = {"peft_type": str, "r": int, "lora_alpha": float, "use_rslora": bool, "fan_in_fan_out": bool,
                 "rank_pattern": dict[str, int] | None, "alpha_pattern": dict[str, float] | None}
_QUANTIFIER = re.compile(r"[*+{]|(?<!\()\?")  # a ? right after ( opens an extension, (?: or (?P<


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter checkpoint: an adapter config and no full model weights beside it."""
    folder = Path(folder)
    if not regular_file(folder / ADAPTER_CONFIG):
        return False
    full = [p for p in folder.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS]
    return not full and not any(folder.glob("pytorch_model*.bin"))


def check_pattern_key(key: str, field: str, config: Path) -> None:
    r"""Refuse a ``rank_pattern`` / ``alpha_pattern`` key whose regular expression could take hours to match.

    PEFT matches each key as ``(.*\.)?(KEY)$``, backtracking: a repeated group (``(a+)+``, ``(a|a)*``) is
    exponential in the module name's length, k repeats in a row are n^k. Refused: a quantifier after a group,
    more than 2 quantifiers or 4 ``|``, a backreference; names and simple regexes (``layers\.[0-3]\.q_proj``)
    pass, and match in at most n^3 steps for a module name of n characters.
    """
    bare = re.sub(r"\\.", "_", key)  # escaped characters are literals
    if (re.search(r"\)[*+?{]", bare) or len(_QUANTIFIER.findall(bare)) > 2 or bare.count("|") > 4
            or re.search(r"\\[1-9]|\(\?P=", key)):
        raise RelexError(f"{config}: {field} key {key[:60]!r} is a regular expression relex does not run: it "
                         "could take hours to match (a repeated group, more than 2 repeats or 4 alternatives, "
                         "a backreference)")
    try:
        re.compile(key)
    except re.error as exc:
        raise RelexError(f"{config}: {field} key {key[:60]!r} is not a regular expression ({exc})") from None


def pattern_key(patterns, module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module`` (PEFT's get_pattern_key); the keys
    passed ``check_pattern_key``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class _Lora:
    """One adapted weight: its factors' keys, scale and whether the product is transposed."""

    a: str
    b: str
    scale: float
    transpose: bool


class AdapterReader:
    """Deltas (and merged values) of the base's tensors for one PEFT LoRA adapter checkpoint."""

    stores_weights = False  # its file holds factors of W - W_0, read as float64 deltas (``read_delta``)

    def __init__(self, folder: Path, base: "CheckpointReader") -> None:
        self.folder = Path(folder)
        self.base = base
        self.config_path = self.folder / ADAPTER_CONFIG
        weights = self.folder / ADAPTER_WEIGHTS
        if not regular_file(weights):
            bins = sorted(self.folder.glob("adapter_model*.bin"))
            raise RelexError(f"{bins[0]}: pickle adapter refused; save it with safetensors" if bins else
                             f"{self.folder}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        self.files = [weights]
        self.specs: dict[str, TensorSpec] = dict(base.specs)
        config = self._config()
        self._loras: dict[str, _Lora] = {}               # weight name -> its LoRA factors
        self._biases: dict[str, tuple[str, float]] = {}  # bias name -> (lora_B.bias key, scale): lora_bias
        self._full: dict[str, str] = {}                  # tensor name -> adapter key holding its whole value
        try:
            with safe_open(str(weights), framework="pt") as handle:
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise RelexError(f"{weights}: corrupt or truncated adapter file ({exc})") from None
        self._index(config, shapes)

    def _config(self) -> dict:
        config = read_json_object(self.config_path, _CONFIG_SHAPE)
        for field in ("rank_pattern", "alpha_pattern"):
            for key in config.get(field) or {}:
                check_pattern_key(key, field, self.config_path)
        if config.get("peft_type", "LORA") != "LORA":
            raise RelexError(f"{self.config_path}: peft_type {config.get('peft_type')} is not supported "
                             "(only LoRA adapters can be merged as W_0 + B @ A * scale)")
        used = [k for k in _UNSUPPORTED if config.get(k)]
        if used:
            raise RelexError(f"{self.config_path}: {used[0]} is not supported (its merge is not B @ A * scale)")
        return config

    def _index(self, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
        """Map every adapter key to the base tensor it changes, and check shapes and ranks."""
        weights = self.files[0]
        parts: dict[str, dict[str, str]] = {}
        for key in shapes:
            short = key.removeprefix(PREFIX)
            match = _LORA_KEY.fullmatch(short)
            if match:
                part = match["part"] + (".bias" if match["param"] == "bias" else "")
                parts.setdefault(match["module"], {})[part] = key
                continue
            # a whole tensor: modules_to_save, a trained bias, or an adapted embedding's own weight
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", short).replace(".base_layer.", ".")
            if name not in self.specs:
                raise RelexError(f"{weights}: adapter tensor '{key}' matches no tensor of the base "
                                 f"(looked for '{name}')")
            if shapes[key] != self.specs[name].shape:
                raise RelexError(f"{weights}: adapter tensor '{key}' has shape {list(shapes[key])}, "
                                 f"base has {list(self.specs[name].shape)}")
            if name in self._full:
                raise RelexError(f"{weights}: tensors '{self._full[name]}' and '{key}' both replace '{name}'")
            self._full[name] = key
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for module, found in parts.items():
            embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
            a_key = found.get("lora_embedding_A" if embedding else "lora_A")
            b_key = found.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise RelexError(f"{weights}: module '{module}' has only one of its LoRA factors")
            name = f"{module}.weight"
            if name not in self.specs:
                raise RelexError(f"{weights}: LoRA module '{module}' matches no tensor of the base (no '{name}')")
            a, b, target = shapes[a_key], shapes[b_key], self.specs[name].shape
            rank = a[0] if len(a) == 2 else 0
            transpose = embedding or bool(config.get("fan_in_fan_out"))
            out_in = (b[0], a[1]) if len(a) == 2 and len(b) == 2 else None
            if out_in is None or rank == 0 or b[1] != rank or (out_in[::-1] if transpose else out_in) != target:
                raise RelexError(f"{weights}: LoRA factors of '{module}' ({list(a)}, {list(b)}) do not make "
                                 f"the base tensor's shape {list(target)}")
            r_key = pattern_key(rank_pattern, module)
            expected_rank = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
            if expected_rank != rank:
                raise RelexError(f"{weights}: module '{module}' has rank {rank}, {ADAPTER_CONFIG} says "
                                 f"{expected_rank}")
            a_key_alpha = pattern_key(alpha_pattern, module)
            alpha = alpha_pattern[a_key_alpha] if a_key_alpha is not None else config.get("lora_alpha", 8)
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            bias = found.get("lora_B.bias")
            if bias is not None and f"{module}.bias" not in self.specs:
                raise RelexError(f"{weights}: '{bias}' but the base has no '{module}.bias'")
            self._loras[name] = _Lora(a_key, b_key, float(scale), transpose)
            if bias is not None:
                self._biases[f"{module}.bias"] = (bias, float(scale))

    @property
    def scales(self) -> dict[str, float]:
        """The LoRA scale of each adapted weight (alpha / r or alpha / sqrt(r), patterns applied)."""
        return {name: lora.scale for name, lora in self._loras.items()}

    # -- CheckpointReader's interface ------------------------------------------------------------
    def file_of(self, name: str) -> Path:
        adapted = name in self._loras or name in self._biases or name in self._full
        return self.files[0] if adapted else self.base.file_of(name)

    def read_delta(self, name: str, start: int = 0, stop: int | None = None, *, base: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of W - W_0 for tensor ``name``, float64 (zeros where nothing was adapted).

        As ``CheckpointReader.read_delta``, but from the adapter's factors: ``base`` (W_0's rows, as the caller
        has them) only gives the result's shape and device; computed in ``out`` when given (a CPU float64 buffer:
        no temporary the size of the rows, which the memory budget does not count); ``buffer`` unused.
        """
        spec = self.specs[name]
        stop = spec.rows if stop is None else min(stop, spec.rows)
        shape = spec.shape and (stop - start,) + spec.shape[1:]
        direct = out is not None and out.device.type == "cpu" and out.is_contiguous()
        into = out if direct else torch.empty(shape, dtype=torch.float64)
        delta = into.view(shape)
        if name in self._loras or name in self._biases or name in self._full:
            self._delta_into(name, start, stop, delta)
        else:
            delta.zero_()
        if out is not None:
            return into if into is out else out.copy_(delta.reshape(out.shape))
        return delta if base is None else delta.reshape(base.shape).to(base.device)

    def _delta_into(self, name: str, start: int, stop: int, delta: torch.Tensor) -> None:
        """``read_delta``'s arithmetic into ``delta`` (the rows' shape) for an adapted tensor, from the adapter file
        opened once."""
        lora, bias, full = self._loras.get(name), self._biases.get(name), self._full.get(name)
        filled = False
        with self._adapter_file(name) as handle:
            if full is not None:
                value = handle.get_tensor(full)
                delta.copy_(value if value.dim() == 0 else value[start:stop]).sub_(self.base.read(name, start, stop))
                filled = True
            if bias is not None:
                bias_rows = handle.get_tensor(bias[0]).double()[start:stop] * bias[1]
                if filled:
                    delta.add_(bias_rows)
                else:
                    delta.copy_(bias_rows)
                filled = True
            if lora is not None:
                left, right = self._lora_factors(handle, lora)
                left = left[start:stop]
                if filled:
                    delta.add_(torch.mm(left, right).mul_(lora.scale))
                else:
                    torch.mm(left, right, out=delta).mul_(lora.scale)

    def delta_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right), float64, whose product is W - W_0 of 2-D tensor ``name`` (rank r: the LoRA factors with
        the scale in ``right``; rank 0 where nothing was adapted), or None where the delta is not that product
        alone (a whole saved value, a LoRA bias, not 2-D). Rank-r deltas have exact SVDs from r x r ones."""
        spec = self.specs[name]
        if len(spec.shape) != 2 or name in self._full or name in self._biases:
            return None
        lora = self._loras.get(name)
        if lora is None:
            return (torch.zeros(spec.shape[0], 0, dtype=torch.float64),
                    torch.zeros(0, spec.shape[1], dtype=torch.float64))
        with self._adapter_file(name) as handle:
            left, right = self._lora_factors(handle, lora)
        return left, right * lora.scale

    @contextmanager
    def _adapter_file(self, name: str) -> Iterator:
        """The adapter file opened for reading ``name``'s factors; a RelexError naming both if that fails."""
        try:
            with safe_open(str(self.files[0]), framework="pt") as handle:
                yield handle
        except (SafetensorError, OSError) as exc:
            raise RelexError(f"{self.files[0]}: cannot read the factors of '{name}' ({exc}; was the checkpoint "
                             "removed or rewritten during the run?)") from None

    @staticmethod
    def _lora_factors(handle, lora: _Lora) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float64, unscaled, or (A^T, B^T) for embeddings and fan_in_fan_out layers, whose merge is
        (B @ A)^T: the delta is left @ right * scale, rows x r times r x row_numel."""
        a, b = handle.get_tensor(lora.a).double(), handle.get_tensor(lora.b).double()
        return (a.T, b.T) if lora.transpose else (b, a)

    def read(self, name: str, start: int = 0, stop: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the merged tensor W_0 + Delta in float64 (``buffer`` is not used).

        The sum is rounded once in float64; the engine reads ``read_delta`` instead, which is exact.
        """
        return self.base.read(name, start, stop).double() + self.read_delta(name, start, stop)

    def fingerprint(self) -> list[list]:
        """File identities of the adapter weights and config (alpha and rank live in the config)."""
        return [file_fingerprint(f) for f in (*self.files, self.config_path)]

    def close(self) -> None:
        """Nothing held open: each read opens the adapter file briefly."""
