"""`relex eval MODEL --dataset FILE.jsonl`: pass@1 of any HF chat model on a user's math file, graded by math-verify.

Each line of the file is a JSON object with ``prompt`` (the question, sent as one user message through the
model's chat template, or as is when the tokenizer has none) and ``answer`` (the reference, e.g. ``42`` or
``\\frac{1}{2}``). Decoding is greedy; backends: HF ``generate`` (batched, left-padded; GPU when present) or
vLLM (needs the package and a CUDA GPU).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexError
from relex.lab.evaluate import Score
from relex.lab.grading import grade
from relex.lab.tasks import Problem


@dataclass(frozen=True)
class Item:
    """One dataset line: the raw question and its reference answer."""

    prompt: str
    answer: str


def read_dataset(path: Path) -> list[Item]:
    """The items of a JSONL file with ``prompt`` and ``answer`` fields; a bad line is a RelexError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RelexError(f"{path}: no such dataset file")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RelexError(f"{path}:{number}: invalid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise RelexError(f"{path}:{number}: need a JSON object with a string 'prompt' and an 'answer'")
        items.append(Item(row["prompt"], str(row["answer"])))
    if not items:
        raise RelexError(f"{path}: no items")
    return items


def write_dataset(path: Path, items: list[Item]) -> None:
    """Write ``items`` as JSONL (the format `read_dataset` reads)."""
    Path(path).write_text("".join(json.dumps({"prompt": i.prompt, "answer": i.answer}) + "\n" for i in items))


@dataclass
class FileTask:
    """A dataset file seen as a lab task: its held-out set is every item, verified by math-verify."""

    heldout: list[Problem]
    max_new_tokens: int

    @staticmethod
    def verify(completion: str, answer: str) -> bool:
        return grade(completion, answer)


def render_items(items: list[Item], tokenizer) -> list[Problem]:
    """Problems whose prompts are the items rendered with the tokenizer's chat template (raw without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return [Problem(i.prompt, i.answer) for i in items]
    return [Problem(tokenizer.apply_chat_template([{"role": "user", "content": i.prompt}], tokenize=False,
                                                  add_generation_prompt=True), i.answer) for i in items]


def check_backend(backend: str) -> None:
    """Refuse ``vllm`` unless the package is installed and a CUDA GPU is present."""
    if backend != "vllm":
        return
    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise RelexError("--backend vllm needs the vllm package and a CUDA GPU; use --backend hf")


def score_vllm(model_dir: Path, problems: list[Problem], max_new_tokens: int) -> Score:
    """Greedy pass@1 with vLLM (one engine per model folder)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="auto", seed=0)
    outputs = llm.generate([p.prompt for p in problems], SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    texts = [o.outputs[0].text for o in outputs]
    return Score(tuple(grade(t, p.answer) for t, p in zip(texts, problems, strict=True)))


def score_dataset(model_dirs: list[Path], items: list[Item], backend: str = "hf", max_new_tokens: int = 512,
                  batch_size: int = 64, tokenizer_dir: Path | None = None, adapter_base: Path | None = None,
                  quiet: bool = False) -> dict[Path, Score]:
    """Greedy pass@1 of each model folder on ``items`` (math-verify), with the chosen backend."""
    import torch
    from tqdm.auto import tqdm

    from relex.lab.evaluate import load_model, load_tokenizer, score_model

    check_backend(backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores: dict[Path, Score] = {}
    for d in tqdm(model_dirs, desc="eval", disable=quiet, leave=False):
        d = Path(d)
        tokenizer = load_tokenizer(d, tokenizer_dir)
        task = FileTask(render_items(items, tokenizer), max_new_tokens)
        if backend == "vllm":
            scores[d] = score_vllm(d, task.heldout, max_new_tokens)
        else:
            scores[d] = score_model(load_model(d, adapter_base).to(device), tokenizer, task, batch_size)
    return scores
