"""`relex eval MODEL --dataset FILE.jsonl`: pass@1 of any HF chat model on a user's math file, graded by math-verify.

Each line of the file is a UTF-8 JSON object with ``prompt`` (the question, sent as one user message through
the model's chat template, or as is when the tokenizer has none; not empty, and within the model's context once
rendered) and ``answer`` (the reference, e.g. ``"42"`` or ``"\\frac{1}{2}"``; a JSON number is read as its
text, ``null``, ``true`` or an empty string refused). Decoding is greedy; backends: HF ``generate`` (batched,
left-padded; GPU when present) or vLLM (needs the package with a CUDA GPU, or its CPU build). A bad line or
weight file is one RelexError naming it, before any model runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from relex.errors import RelexError
from relex.eval.chat import render

if TYPE_CHECKING:
    from relex.eval.scoring import Score

# No tokenizer packs text this tightly: a prompt longer than this many characters per context token is refused
# untokenized (tokenizing 4M characters took 9 s, generating from them would allocate terabytes).
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer, both plain strings (``where``: ``FILE:LINE`` for messages): a dataset
    line, a lab task's problem, and once rendered for a tokenizer, what a model is scored on."""

    prompt: str
    answer: str
    where: str = field(default="", compare=False)


def read_dataset(path: Path) -> list[Problem]:
    """The items of a JSONL file with ``prompt`` and ``answer`` fields; a bad line is a RelexError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RelexError(f"{path}: no such dataset file")
    items = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                items.append(_item(raw, f"{path}:{number}"))
    if not items:
        raise RelexError(f"{path}: no items")
    return items


def _item(raw: bytes, where: str) -> Problem:
    """One non-blank line as an Problem; RelexError ``FILE:LINE: ...`` for anything ``score_dataset`` cannot use."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RelexError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise RelexError(f"{where}: invalid JSON ({exc})") from None
    except RecursionError:
        raise RelexError(f"{where}: JSON nested too deeply") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
        raise RelexError(f"{where}: need a JSON object with a string 'prompt' and an 'answer'")
    if not row["prompt"].strip():
        raise RelexError(f"{where}: empty 'prompt'")
    return Problem(row["prompt"], _answer_text(row["answer"], where), where)


def _answer_text(answer: object, where: str) -> str:
    """The reference answer as text: a non-empty string as is, a finite JSON number as Python writes it."""
    if isinstance(answer, str) and answer.strip():
        return answer
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        return str(answer)
    raise RelexError(f"{where}: 'answer' must be a non-empty string or a number, not {json.dumps(answer)[:40]}")


def write_dataset(path: Path, items: list[Problem]) -> None:
    """Write ``items`` as JSONL (the format `read_dataset` reads)."""
    Path(path).write_text("".join(json.dumps({"prompt": i.prompt, "answer": i.answer}) + "\n" for i in items))


@dataclass
class FileTask:
    """A dataset file seen as a lab task: its held-out set is every item, verified by math-verify."""

    heldout: list[Problem]
    max_new_tokens: int

    @staticmethod
    def verify(completion: str, answer: str) -> bool:
        from relex.eval.grading import grade  # math-verify, imported only to grade

        return grade(completion, answer)


def render_items(items: list[Problem], tokenizer) -> list[Problem]:
    """The problems with their prompts rendered for ``tokenizer`` (``relex.eval.chat.render``)."""
    return [Problem(render(tokenizer, i.prompt), i.answer, i.where) for i in items]


def check_prompts(problems: list[Problem], items: list[Problem], tokenizer, context: int | None, model_dir: Path) -> None:
    """Refuse a rendered prompt longer than the model's context (``context`` tokens; None: unknown), naming its line."""
    if context is None:
        return
    for problem, item in zip(problems, items, strict=True):
        chars = len(problem.prompt)
        tokens = None if chars > MAX_CHARS_PER_TOKEN * context else len(tokenizer(problem.prompt)["input_ids"])
        if tokens is None or tokens > context:
            size = f"{chars:,} characters" if tokens is None else f"{tokens:,} tokens"
            raise RelexError(f"{item.where}: prompt of {size} is longer than {model_dir}'s context of {context:,} "
                             "tokens")


def context_length(model_dir: Path, adapter_base: Path | None) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its config, an adapter's base's), if it says."""
    for folder in (model_dir, adapter_base):
        config = Path(folder) / "config.json" if folder is not None else None
        if config is not None and config.is_file():
            try:
                value = json.loads(config.read_text()).get("max_position_embeddings")
            except (OSError, ValueError, AttributeError) as exc:
                raise RelexError(f"{config}: cannot read JSON ({exc})") from None
            return value if isinstance(value, int) and value > 0 else None
    return None


def check_weight_files(folder: Path) -> None:
    """Refuse a truncated or corrupt ``.safetensors`` file of a model folder, naming it, before transformers loads it
    (its error names neither file nor folder)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):  # safetensors' own check of the header and the file's size
                pass
        except (SafetensorError, OSError) as exc:
            raise RelexError(f"{file}: corrupt or truncated weight file ({exc})") from None


def check_backend(backend: str) -> None:
    """Refuse ``vllm`` unless the package is installed, with a CUDA GPU or as vLLM's CPU build."""
    if backend != "vllm":
        return
    import torch

    from relex.eval.vllm_engine import vllm_cpu_build

    if importlib.util.find_spec("vllm") is None or not (torch.cuda.is_available() or vllm_cpu_build()):
        raise RelexError("--backend vllm needs the vllm package and a CUDA GPU (or vLLM's CPU build, "
                         "e.g. the vllm-cpu package); use --backend hf")


def score_vllm(model_dir: Path, problems: list[Problem], max_new_tokens: int) -> "Score":
    """Greedy pass@1 with vLLM (one engine per model folder)."""
    from vllm import SamplingParams

    from relex.eval.grading import grade
    from relex.eval.scoring import Score
    from relex.eval.vllm_engine import new_llm

    llm = new_llm(model_dir)
    outputs = llm.generate([p.prompt for p in problems], SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
                           use_tqdm=False)  # relex draws its own bar
    texts = [o.outputs[0].text for o in outputs]
    return Score(tuple(grade(t, p.answer) for t, p in zip(texts, problems, strict=True)))


def score_dataset(model_dirs: list[Path], items: list[Problem], backend: str = "hf", max_new_tokens: int = 512,
                  batch_size: int = 64, tokenizer_dir: Path | None = None, adapter_base: Path | None = None,
                  quiet: bool = False) -> "dict[Path, Score]":
    """Greedy pass@1 of each model folder on ``items`` (math-verify), with the chosen backend; every folder's
    weight files and rendered prompts are checked before the first model runs."""
    import torch
    from tqdm.auto import tqdm

    from relex.eval.scoring import load_model, load_tokenizer, score_model

    check_backend(backend)
    if adapter_base is not None:
        check_weight_files(adapter_base)
    prepared = {}
    for d in map(Path, model_dirs):
        check_weight_files(d)
        tokenizer = load_tokenizer(d, tokenizer_dir)
        task = FileTask(render_items(items, tokenizer), max_new_tokens)
        check_prompts(task.heldout, items, tokenizer, context_length(d, adapter_base), d)
        prepared[d] = tokenizer, task
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = {}
    for d, (tokenizer, task) in tqdm(prepared.items(), desc="eval", disable=quiet, leave=False):
        if backend == "vllm":
            scores[d] = score_vllm(d, task.heldout, max_new_tokens)
        else:
            scores[d] = score_model(load_model(d, adapter_base).to(device), tokenizer, task, batch_size)
    return scores
