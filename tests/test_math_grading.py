"""math-verify grading of `relex eval --dataset` files: answer forms, wrong and missing answers, bad files, the CLI."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("math_verify")
pytest.importorskip("trl")

from relex.errors import RelexError  # noqa: E402
from relex.eval.dataset import FileTask, Problem, read_dataset, render_items, write_dataset  # noqa: E402
from relex.eval.grading import grade  # noqa: E402
from relex.lab.math_task import MathTask  # noqa: E402

# (completion, reference answer, expected verdict): every form a model's final answer takes
CASES = [
    ("\\boxed{122}", "122", True),
    ("59 + 63 = 122. So the answer is \\boxed{122}.", "122", True),
    ("The answer is 122.", "122", True),
    ("122", "122", True),
    ("$122$", "122", True),
    ("\\boxed{122.0}", "122", True),
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{121}", "122", False),  # wrong
    ("59 + 63 = 121.", "122", False),  # wrong plain number
    ("\\boxed{121} but maybe 122", "122", False),  # the boxed answer wins over a later number
    ("I do not know.", "122", False),  # no answer
    ("", "122", False),  # empty completion
    ("59 + 63 is not allowed.", "122", False),  # the question restated: math-verify would evaluate it (a reward hack)
    ("\\boxed{59+63}", "122", False),  # boxed arithmetic is not a stated answer either
    ("59 + 63 = 122", "122", True),  # worked, then stated
    ("\\boxed{-5}", "-5", True),  # a negative number is a value
    ("The answer is 1/2.", "\\frac{1}{2}", True),  # a fraction is a value
    ("\\boxed{3 + 4}", "3 + 4", True),  # unless the reference itself is arithmetic
]


@pytest.fixture
def graded_file(tmp_path: Path) -> Path:
    """A JSONL file in the `--dataset` format, each line carrying the completion to grade beside its answer."""
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a, "completion": c, "expected": e}) + "\n"
                            for i, (c, a, e) in enumerate(CASES)))
    return path


def test_grade_every_answer_form_from_a_dataset_file(graded_file: Path) -> None:
    items = read_dataset(graded_file)
    rows = [json.loads(line) for line in graded_file.read_text().splitlines()]
    assert [i.answer for i in items] == [r["answer"] for r in rows]
    task = FileTask(render_items(items, tokenizer=None), max_new_tokens=8)
    verdicts = [task.verify(r["completion"], p.answer) for r, p in zip(rows, task.heldout, strict=True)]
    assert verdicts == [r["expected"] for r in rows]


def test_numeric_answers_round_trip(tmp_path: Path) -> None:
    items = [Problem("What is 2 + 3?", "5"), Problem("Half of one?", "\\frac{1}{2}")]
    write_dataset(tmp_path / "d.jsonl", items)
    assert read_dataset(tmp_path / "d.jsonl") == items
    assert grade("\\boxed{5}", "5") and not grade("\\boxed{6}", "5")


@pytest.mark.parametrize(("text", "message"), [
    ("{not json\n", "invalid JSON"),
    ('{"prompt": "q"}\n', "'prompt' and an 'answer'"),
    ('[1, 2]\n', "'prompt' and an 'answer'"),
    ("\n", "no items"),
])
def test_bad_dataset_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(RelexError, match=message) as err:
        read_dataset(path)
    assert str(path) in str(err.value)


def test_math_task_heldout_fixed_disjoint_and_verified() -> None:
    task = MathTask(lambda m: f"<user>{m}<assistant>", heldout_size=100)
    assert task.heldout == MathTask(lambda m: f"<user>{m}<assistant>", heldout_size=100).heldout
    assert not any(task.is_heldout(p.prompt) for p in task.sample_many(2000, random.Random(0)))
    for line, problem in zip(task.dataset(task.heldout), task.heldout, strict=True):
        message, answer = line.prompt, line.answer
        assert problem.prompt == f"<user>{message}<assistant>" and "\\boxed{}" in message
        assert task.verify(f"\\boxed{{{answer}}}", answer) and not task.verify(f"\\boxed{{{int(answer) + 1}}}", answer)


def test_math_task_kinds_restrict_the_arithmetic_drawn() -> None:
    """``kinds`` picks the arithmetic kinds for training and held-out alike; an unknown kind is refused."""
    task = MathTask(lambda m: m, heldout_size=200, word_share=0.0, kinds="+*")
    questions = [m.prompt for m in task.dataset(task.heldout)]
    questions += [p.prompt for p in task.sample_many(500, random.Random(1))]
    assert all((" + " in q) != (" * " in q) and " - " not in q for q in questions)
    assert {" + " in q for q in questions} == {True, False}
    assert task.spec()["kinds"] == "+*"
    with pytest.raises(ValueError, match="kinds"):
        MathTask(lambda m: m, heldout_size=10, kinds="+/")


def test_eval_dataset_cli_on_a_real_model(tmp_path: Path) -> None:
    """`relex eval MODEL --dataset` end to end on a pico HF model: every item graded, pass@1 with its stderr."""
    from conftest import save_pico_model

    model, other = save_pico_model(tmp_path / "pico"), save_pico_model(tmp_path / "pico2", seed=1)
    data = tmp_path / "d.jsonl"
    write_dataset(data, [Problem("1+2=", "3"), Problem("2+2=", "4"), Problem("9+9=", "18")])
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "relex", "eval", str(model), str(other), "--dataset", str(data),
                           "--max-new-tokens", "4", "--batch-size", "2", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    score = doc["scores"][str(model)]
    assert doc["grader"] == "math-verify" and doc["items"] == 3 and score["total"] == 3
    p = score["accuracy"]
    assert score["correct"] == round(3 * p) and math.isclose(score["stderr"], math.sqrt(p * (1 - p) / 3))
    assert len(score["outcomes"]) == 3 and score["outcomes"].count("1") == score["correct"]
    lines = proc.stdout.strip().splitlines()  # one per model; the second with its paired difference to the first
    assert len(lines) == 2 and "paired" not in lines[0] and "vs the first, paired" in lines[1]


def test_eval_dataset_needs_no_lab(tmp_path: Path) -> None:
    """`relex eval --dataset` is the product's (the eval extra): it runs where the lab cannot be imported, and
    asking for a lab task there is one line, exit 2."""
    from conftest import save_pico_model

    model = save_pico_model(tmp_path / "pico")
    data = tmp_path / "d.jsonl"
    write_dataset(data, [Problem("1+2=", "3"), Problem("2+2=", "4")])
    no_lab = "import sys; sys.modules['relex.lab.cli'] = None; from relex.cli import run; sys.argv[0] = 'relex'; run()"
    run = [sys.executable, "-c", no_lab, "eval", str(model)]
    proc = subprocess.run([*run, "--dataset", str(data), "--max-new-tokens", "2", "--score-only"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 0.0 <= float(proc.stdout.strip()) <= 1.0
    proc = subprocess.run([*run, "--profile", "ci"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --profile" in proc.stderr
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 2 and "needs the lab extra" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_eval_dataset_refuses_bad_input(tmp_path: Path) -> None:
    from conftest import save_pico_model

    model = save_pico_model(tmp_path / "pico")
    data = tmp_path / "d.jsonl"
    write_dataset(data, [Problem("1+2=", "3")])
    for extra, message in ((["--backend", "vllm"], "--backend vllm needs"), (["--profile", "ci"], "--dataset grades")):
        proc = subprocess.run([sys.executable, "-m", "relex", "eval", str(model), "--dataset", str(data), *extra],
                              capture_output=True, text=True)
        if extra[0] == "--backend" and "vllm needs" not in proc.stderr and proc.returncode == 0:
            pytest.skip("vllm and a GPU are present")
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "relex", "eval", str(model), "--dataset", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "none.jsonl" in proc.stderr


def test_eval_takes_the_tokenizer_of_base_when_the_model_has_none(tmp_path: Path) -> None:
    """relex outputs may carry no tokenizer: `--base` supplies it (as it supplies adapters' base weights)."""
    from conftest import save_pico_model

    base = save_pico_model(tmp_path / "base")
    bare = save_pico_model(tmp_path / "bare", seed=1)
    for f in bare.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    data = tmp_path / "d.jsonl"
    write_dataset(data, [Problem("1+2=", "3")])
    command = [sys.executable, "-m", "relex", "eval", str(bare), "--dataset", str(data), "--max-new-tokens", "2", "-q"]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2 and "tokenizer" in refused.stderr
    proc = subprocess.run([*command, "--base", str(base)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
