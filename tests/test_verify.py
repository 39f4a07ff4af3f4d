"""Verified extrapolation: the split, the race and the decision, on outcomes whose truth is known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from relex.errors import RelexError
from relex.verify import Candidate, race, split_problems, verify


@pytest.mark.parametrize("n, share", [(4, 0.5), (9, 0.3), (200, 0.5), (1000, 0.9)])
def test_split_parts_never_overlap_and_cover_everything(n, share):
    decision, confirmation = split_problems(n, seed=7, confirm_share=share)
    assert len(decision) >= 2 and len(confirmation) >= 2
    assert not set(decision) & set(confirmation)
    assert sorted([*decision, *confirmation]) == list(range(n))
    again = split_problems(n, seed=7, confirm_share=share)
    assert np.array_equal(decision, again[0]) and np.array_equal(confirmation, again[1])


def test_split_refuses_too_few_problems_and_a_bad_share():
    with pytest.raises(RelexError, match="at least 4"):
        split_problems(3)
    with pytest.raises(RelexError, match="between 0 and 1"):
        split_problems(100, confirm_share=1.0)


def table_scorer(truth: dict[Candidate | None, np.ndarray], calls: list | None = None):
    """A scorer reading fixed per-problem outcomes (the incumbent under None)."""
    def score(c, idx):
        if calls is not None:
            calls.append((c, len(idx)))
        return truth[c][idx]
    return score


def outcomes(rng, n, p):
    return rng.random(n) < p


def test_race_drops_the_clearly_worse_and_picks_the_best():
    rng = np.random.default_rng(0)
    n = 600
    incumbent = outcomes(rng, n, 0.4)
    good, bad, same = Candidate(40, 0.5), Candidate(80, 1.0), Candidate(40, 0.25)
    truth = {None: incumbent, good: incumbent | outcomes(rng, n, 0.3), bad: outcomes(rng, n, 0.05), same: incumbent}
    calls = []
    result = race([good, bad, same], table_scorer(truth, calls), np.arange(n), rounds=3)
    assert result.dropped.get(bad) == 1 and good not in result.dropped
    assert result.pick() == good
    scored = {c: sum(k for cc, k in calls if cc == c) for c in truth}
    assert scored[bad] == 200 and scored[good] == n  # the dropped one costs one round, not the whole part


def test_verify_publishes_a_real_gain_and_refuses_noise():
    rng = np.random.default_rng(1)
    n = 400
    incumbent = outcomes(rng, n, 0.5)
    better = Candidate(30, 1.0)
    truth = {None: incumbent, better: incumbent | outcomes(rng, n, 0.4)}
    verdict = verify([better], table_scorer(truth), n, seed=3)
    assert verdict.published and verdict.pick == better
    gain, se = verdict.confirmation
    assert gain > 0.1 and se > 0

    # candidates that are the incumbent with a few problems flipped either way: none is a real gain
    flips = {Candidate(t, s): incumbent ^ outcomes(np.random.default_rng(t), n, 0.02)
             for t in (20, 30) for s in (0.5, 1.0)}
    verdict = verify(list(flips), table_scorer({None: incumbent, **flips}), n, seed=3, margin=2.0)
    assert not verdict.published


def test_verdict_json_has_every_candidate_and_disjoint_parts():
    rng = np.random.default_rng(2)
    n = 50
    cands = [Candidate(t, s) for t in (10, 20) for s in (0.5, 1.0)]
    truth = {None: outcomes(rng, n, 0.5), **{c: outcomes(rng, n, 0.5) for c in cands}}
    doc = verify(cands, table_scorer(truth), n).as_dict()
    assert len(doc["candidates"]) == 4 and sum(r["picked"] for r in doc["candidates"]) == 1
    assert not set(doc["split"]["decision"]) & set(doc["split"]["confirmation"])
    assert doc["decision"]["published"] == (doc["decision"]["gain"] > doc["decision"]["margin"] * doc["decision"]["gain_se"])


# -- end to end on a pico model: a run built to gain, and one built to collapse ---------------------------
SEVEN = 9  # the pico tokenizer's id of "7"


def answer_run(tmp_path, gain: bool, steps=(1, 2, 3, 4), n=80, base_model=None):
    """A pico run whose lm_head row of "7" moves linearly towards the prompts' mean final hidden state.

    ``gain``: every answer is "7", so the run gains with the horizon (stopping at step 4 is ~20% right); else
    every answer is the base's own greedy token, so the run moves away from them and extrapolation collapses.
    ``base_model``: saves the base in a folder (default conftest's save_pico_model).
    Returns (base, run, dataset file, a target far enough to answer ~95% with "7")."""
    import json
    import random

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from conftest import make_tokenizer, save_pico_model

    base = (base_model or save_pico_model)(tmp_path / "base")
    tok = make_tokenizer()
    rng = random.Random(0)
    prompts = ["".join(rng.choice("0123456789+= abc") for _ in range(rng.randint(3, 7))) for _ in range(4 * n)]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = torch.stack([model.model(**tok(p, return_tensors="pt")).last_hidden_state[0, -1] for p in prompts])
        logits = hidden @ model.lm_head.weight.T
    u = hidden.mean(0) / hidden.mean(0).norm()
    reach = hidden @ u
    gap = logits.max(-1).values - logits[:, SEVEN]
    greedy = [tok.decode([int(k)]) for k in logits.argmax(-1)]  # a special or blank token is no answer to grade
    keep = [i for i in range(len(prompts)) if reach[i] > 0.05 and gap[i] > 0 and logits[i].argmax() != SEVEN
            and logits[i].argmax() >= 2 and greedy[i].strip()][:n]
    ratio = (gap[keep] / reach[keep]).double()
    rate = float(ratio.quantile(0.2)) / steps[-1]  # logit shift per step and unit reach: ~20% flip at the cutoff
    target = int(np.ceil(float(ratio.quantile(0.95)) / rate))
    w0 = load_file(str(base / "model.safetensors"))
    for step in steps:
        tensors = dict(w0)
        head = w0["lm_head.weight"].double().clone()
        head[SEVEN] += rate * step * u.double()
        tensors["lm_head.weight"] = head.float().contiguous()
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    answers = ["7" if gain else greedy[i] for i in keep]
    data = tmp_path / "verify.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompts[i], "answer": a}) + "\n" for i, a in zip(keep, answers)))
    return base, tmp_path / "run", data, target


def exact_match(completion: str, answer: str) -> bool:
    """The tests' grader (``--grader test_verify:exact_match``): the pico model answers one token."""
    return completion == answer


def scored_verdict(tmp_path, gain: bool):
    from relex.eval.dataset import read_dataset
    from relex.materialize import compute_stats
    from relex.methods import METHODS
    from relex.trajectory import Trajectory
    from relex.verify import ModelScorer

    base, run, data, target = answer_run(tmp_path, gain)
    trajectory = Trajectory.discover(base, run).observed(None)
    method = METHODS["relex"]().fit(trajectory, progress=False)
    stats = compute_stats(trajectory, cache=False, progress=False)
    items = read_dataset(data)
    scorer = ModelScorer(trajectory, method, stats, items, max_new_tokens=1, grader="test_verify:exact_match")
    cands = [Candidate(t, s) for t in (8, target // 2, target) for s in (0.5, 1.0)]
    return verify(cands, scorer, len(items), seed=0), target


def test_a_run_that_gains_publishes_the_far_full_candidate(tmp_path):
    verdict, target = scored_verdict(tmp_path, gain=True)
    assert verdict.published, verdict.summary()
    assert verdict.pick.target >= target // 2 and verdict.confirmation[0] > 0.3


def test_a_run_that_collapses_publishes_nothing(tmp_path):
    verdict, _ = scored_verdict(tmp_path, gain=False)
    assert not verdict.published, verdict.summary()
    assert verdict.pick_confirmation <= verdict.incumbent_confirmation


def verify_cli(base, run, data, out, *extra):
    from relex.cli import main

    return main(["extrapolate", "--base", str(base), "--run", str(run), "--out", str(out), "--no-cache", "-q",
                 "--verify", str(data), "--max-new-tokens", "1", "--grader", "test_verify:exact_match", *extra])


def test_cli_verify_publishes_only_the_pick_with_its_record(tmp_path, capsys):
    import json

    base, run, data, target = answer_run(tmp_path, gain=True)
    out = tmp_path / "out"
    assert verify_cli(base, run, data, out, "--target", "8", "--target", str(target),
                      "--verify-json", str(tmp_path / "v.json")) == 0
    [folder] = [p for p in out.iterdir()]
    meta = json.loads((folder / "relex.json").read_text())
    record = json.loads((folder / "verify.json").read_text())
    assert record == json.loads((tmp_path / "v.json").read_text()) == meta["verify"]
    assert folder.name == f"step-{record['decision']['target']}" and record["decision"]["published"]
    assert meta["params"]["shrink"] == record["decision"]["shrink"]
    assert len(record["candidates"]) == 8 and (folder / "verify.png").stat().st_size > 0


def test_cli_verify_of_a_collapsing_run_writes_nothing_and_exits_3(tmp_path, capsys):
    import json

    base, run, data, target = answer_run(tmp_path, gain=False)
    out = tmp_path / "out"
    code = verify_cli(base, run, data, out, "--target", str(target), "--shrink", "1", "--shrink", "0.5",
                      "--verify-json", str(tmp_path / "v.json"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("relex: not verified: ") and err[-1].endswith("nothing written")
    assert not out.exists() and not list(tmp_path.glob(".*relex-tmp*"))
    assert not json.loads((tmp_path / "v.json").read_text())["decision"]["published"]


def test_shrink_writes_the_prediction_moved_towards_the_base(pico, tmp_path):
    from conftest import predicted_deltas
    from relex.cli import main

    base, run, _ = pico
    for shrink in ("1", "0.25"):
        assert main(["extrapolate", "--base", str(base), "--run", str(run), "--target", "40", "--no-cache", "-q",
                     "--out", str(tmp_path / shrink), "--shrink", shrink]) == 0
    full, quarter = (predicted_deltas(tmp_path / s / "step-40", base) for s in ("1", "0.25"))
    for name in full:  # fp32 outputs: one rounding of W_0 + lambda delta, so within fp32 ulps of W_0 + delta/4
        scale = np.abs(full[name]).max() + 1e-30
        assert np.abs(quarter[name] - 0.25 * full[name]).max() <= 1e-6 * max(scale, 1.0)


def test_first_update_scaling_is_two_point_from_one_checkpoint(pico, tmp_path):
    from conftest import predicted_deltas
    from relex.cli import main

    base, run, ckpts = pico
    assert main(["extrapolate", "--base", str(base), "--run", str(run), "--method", "two-point", "--cutoff", "2",
                 "--target", "6", "--no-cache", "-q", "--out", str(tmp_path / "o")]) == 0
    got = predicted_deltas(tmp_path / "o" / "step-6", base)
    from safetensors.torch import load_file

    w0 = load_file(str(base / "model.safetensors"))
    for name, delta in got.items():  # W_0 + 3 (W_2 - W_0)
        ref = 3 * (ckpts[2][name].double() - w0[name].double()).numpy()
        assert np.abs(delta - ref).max() <= 1e-6 * max(np.abs(ref).max(), 1.0)


def test_several_shrinks_without_verify_are_refused(pico, tmp_path, capsys):
    from relex.cli import main

    base, run, _ = pico
    assert main(["extrapolate", "--base", str(base), "--run", str(run), "--target", "40", "--no-cache", "-q",
                 "--out", str(tmp_path / "o"), "--shrink", "0.5", "--shrink", "1"]) == 2
    assert "need --verify" in capsys.readouterr().err


@pytest.mark.parametrize("gain", [True, False], ids=["gains", "collapses"])
def test_watch_rewrites_only_a_verified_prediction(tmp_path, gain):
    from relex.live.watcher import Watcher
    from relex.verify import VerifyOptions

    base, run, data, target = answer_run(tmp_path, gain=gain)
    options = VerifyOptions(data, shrinks=(0.5, 1.0), max_new_tokens=1, grader="test_verify:exact_match")
    watcher = Watcher(base, run, [target], tmp_path / "out", settle=0.0, cache=False, verify=options)
    watcher.poll()
    assert watcher.status["verify"]["published"] == gain
    assert (tmp_path / "out" / f"step-{target}").exists() == gain


def test_the_callback_does_not_jump_to_an_unverified_prediction(tmp_path):
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from relex.integrations.trl import RelexCallback
    from relex.live.watcher import Watcher

    base, run, data, target = answer_run(tmp_path, gain=False)
    callback = RelexCallback(jump_to=target, base=base, verify=data, cache=False)
    callback.options["verify"] = replace(callback.options["verify"], max_new_tokens=1,
                                         grader="test_verify:exact_match")
    callback.watcher = Watcher(base, run, [], tmp_path / "out", settle=0.0, **callback.options)
    callback.watcher.poll()
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_state_dict(load_file(str(run / "checkpoint-4" / "model.safetensors")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = SimpleNamespace(global_step=4)
    callback._jump(state, model, None, None)
    assert state.global_step == 4 and callback.jumped is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_candidates_stream_in_over_several_worker_threads(tmp_path, monkeypatch):
    """Chunks small enough that the stream's worker threads share each tensor (as on a real model)."""
    import relex.materialize.stream as stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 8 * 5 * 16)  # 16 columns of 4 steps + base
    verdict, _ = scored_verdict(tmp_path, gain=True)
    assert verdict.published
