"""The peer methods (ExPO, two-point with norms from the cutoff, AlphaRL) on trajectories with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import STEPS, predicted_deltas, rank1_run, relative_error, save_pico_model
from relex import METHODS, AlphaRL, ExPO, NExt, Relex, RelexError, Trajectory, TwoPoint, compute_stats, extrapolate
from relex.analysis import alignment
from relex.cli import main
from relex.methods.alpharl import align_signs, load_scores, top_singular_triplet
from relex.methods.pls import PLS1
from relex.stats import TensorStats, gram_of
from relex.trajectory import CheckpointReader, StackedDeltas


# -- ExPO ------------------------------------------------------------------------------------------------
def test_expo_is_cutoff_plus_alpha_times_its_delta(pico, tmp_path):
    base, run, ckpts = pico
    w0 = load_file(str(base / "model.safetensors"))
    [folder] = extrapolate(ExPO(alpha=0.5, cutoff=13).fit(Trajectory.discover(base, run)), tmp_path / "out", [99],
                           dtype="float32", progress=False, cache=False)
    reader = CheckpointReader(folder)
    for name, cut in ckpts[13].items():
        expected = cut.double() + 0.5 * (cut.double() - w0[name].double())
        torch.testing.assert_close(reader.read(name).double(), expected, rtol=1e-6, atol=1e-7)
    meta = json.loads((folder / "relex.json").read_text())
    assert meta["method"] == "expo" and meta["params"] == {"alpha": 0.5, "cutoff": 13, "shrink": 1.0} and meta["target"] == 99


def test_expo_weights_and_target_rules(pico, tmp_path):
    stats = TensorStats(np.array([2.0, 5.0]), np.eye(2))
    np.testing.assert_array_equal(ExPO(alpha=0.3).weights(stats, [7]), [[0.0, 1.3]])
    base, run, _ = pico
    method = ExPO(cutoff=13).fit(Trajectory.discover(base, run))
    with pytest.raises(RelexError, match="identical copies"):
        extrapolate(method, tmp_path / "two", [20, 30], progress=False, cache=False)
    with pytest.raises(RelexError, match="finite"):
        ExPO(alpha=float("nan"))
    # ExPO needs only the cutoff checkpoint (a line needs two; ExPO does not)
    [folder] = extrapolate(ExPO(alpha=0.3, cutoff=2).fit(Trajectory.discover(base, run)), tmp_path / "one", [3],
                           progress=False, cache=False)
    assert json.loads((folder / "relex.json").read_text())["observed_steps"] == [2]


# -- two-point, norms from the cutoff ------------------------------------------------------------------
def test_two_point_norm_rule_on_weights():
    steps = np.array([2.0, 4.0, 8.0])
    method = TwoPoint(norms_from_cutoff=True)
    norm = TensorStats(steps, np.eye(3), "model.layers.0.input_layernorm.weight", (16,))
    np.testing.assert_array_equal(method.weights(norm, [16, 32]), [[0, 0, 1], [0, 0, 1]])
    for other in (TensorStats(steps, np.eye(3), "model.layers.0.self_attn.q_proj.weight", (16, 16)),
                  TensorStats(steps, np.eye(3), "weird.norm.matrix", (4, 4))):  # 2-D: not a norm weight
        np.testing.assert_array_equal(method.weights(other, [16]), [[0, 0, 2]])
    np.testing.assert_array_equal(TwoPoint().weights(norm, [16]), [[0, 0, 2]])
    with pytest.raises(RelexError, match="name"):
        method.weights(TensorStats(steps, np.eye(3)), [16])


def test_two_point_copies_norms_from_the_cutoff(pico, tmp_path):
    base, run, ckpts = pico
    traj = Trajectory.discover(base, run)
    [plain] = extrapolate(TwoPoint(cutoff=8).fit(traj), tmp_path / "plain", [40], progress=False, cache=False)
    [normed] = extrapolate(TwoPoint(cutoff=8, norms_from_cutoff=True).fit(traj), tmp_path / "normed", [40],
                           progress=False, cache=False)
    a, b = CheckpointReader(plain), CheckpointReader(normed)
    norms = [n for n, s in b.specs.items() if "norm" in n and len(s.shape) == 1]
    assert len(norms) == 5  # two per layer and the final norm
    for name in a.specs:
        if name in norms:
            assert torch.equal(b.read(name), ckpts[8][name])
            assert not torch.equal(a.read(name), ckpts[8][name])
        else:
            assert torch.equal(a.read(name), b.read(name))
    assert json.loads((normed / "relex.json").read_text())["params"]["norms_from_cutoff"] is True
    # the closed-form alignment sees tensor names too (from the statistics, or from its dict keys)
    stats = compute_stats(traj, progress=False, cache=False)
    rows = alignment(TwoPoint(norms_from_cutoff=True), stats, [2, 3, 5, 8], [13, 21])
    assert [r["step"] for r in rows] == [13, 21] and all(np.isfinite(r["relative_error"]) for r in rows)
    unnamed = {n: TensorStats(s.steps, s.gram) for n, s in stats.items()}
    assert alignment(TwoPoint(norms_from_cutoff=True), unnamed, [2, 3, 5, 8], [13, 21]) == rows


# -- AlphaRL: its pieces --------------------------------------------------------------------------------
def test_align_signs_walks_back_from_the_last_step():
    a = np.array([[1.0, 0.0], [-1.1, 0.1], [0.0, 0.0], [1.2, 0.0]])
    aligned, flipped = align_signs(a)
    # the zero row has no sign: it is skipped, and the row before it compares with the last step
    np.testing.assert_array_equal(aligned, [[1.0, 0.0], [1.1, -0.1], [0.0, 0.0], [1.2, 0.0]])
    np.testing.assert_array_equal(flipped, [False, True, False, False])
    a = np.array([[1.0, 0.0], [-1.1, 0.1], [1.2, 0.0]])
    aligned, flipped = align_signs(a)
    np.testing.assert_array_equal(aligned, [[1.0, 0.0], [1.1, -0.1], [1.2, 0.0]])
    np.testing.assert_array_equal(flipped, [False, True, False])
    aligned, flipped = align_signs(np.array([[-1.0, 0.0], [-1.1, 0.1], [1.2, 0.0]]))
    np.testing.assert_array_equal(aligned, [[1.0, 0.0], [1.1, -0.1], [1.2, 0.0]])
    np.testing.assert_array_equal(flipped, [True, True, False])


@pytest.mark.parametrize("scale", [False, True])
def test_pls1_on_a_hand_checked_case(scale):
    # X centered: [[-1,-1/3],[0,2/3],[1,-1/3]], y centered [-1,0,1]: X^T y = [2, 0] -> w = [1, 0],
    # scores [-1, 0, 1] (scaling column 1 by its std 1 changes nothing), loadings [1, 0], y = 2 + t;
    # y* = 5 -> score 3 -> x = mean + 3 * loadings = [5, 1/3]
    x = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    pls = PLS1.fit(x, np.array([1.0, 2.0, 3.0]), scale=scale)
    np.testing.assert_allclose(pls.weights, [1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(pls.transform(x), [-1.0, 0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose([pls.slope, pls.intercept], [1.0, 2.0], atol=1e-15)
    np.testing.assert_allclose(pls.invert(5.0), [5.0, 1.0 / 3.0], atol=1e-14)
    np.testing.assert_allclose(pls.predict(x), [1.0, 2.0, 3.0], atol=1e-14)


def test_pls1_inverts_exactly_on_a_line_and_falls_back_to_the_mean():
    rng = np.random.default_rng(0)
    u, y = rng.standard_normal(7), np.array([1.0, 2.0, 4.0, 7.0])
    x = np.outer(0.3 * y - 0.2, u) + 5.0 * rng.standard_normal(7)  # rows on a line in y, plus a fixed offset
    for scale in (False, True):
        pls = PLS1.fit(x, y, scale=scale)
        for target in (0.5, 4.0, 20.0):
            np.testing.assert_allclose(pls.invert(target), (0.3 * target - 0.2) * u + x[0] - (0.3 - 0.2) * u,
                                       rtol=1e-10, atol=1e-10)
    still = PLS1.fit(np.ones((3, 4)), np.array([1.0, 2.0, 3.0]))  # nothing covaries with y
    np.testing.assert_array_equal(still.invert(10.0), np.ones(4))


def test_top_singular_triplet_without_a_full_svd():
    gen = torch.Generator().manual_seed(0)
    for shape in ((30, 20), (7, 40), (3, 3), (1, 5), (64, 64)):
        d = torch.randn(shape, generator=gen, dtype=torch.float64)
        d += 4 * torch.outer(torch.randn(shape[0], generator=gen, dtype=torch.float64),
                             torch.randn(shape[1], generator=gen, dtype=torch.float64))
        u, s, v, converged = top_singular_triplet(d)
        ref_u, ref_s, ref_vt = np.linalg.svd(d.numpy())
        assert converged
        assert abs(s - ref_s[0]) <= 1e-10 * ref_s[0]
        np.testing.assert_allclose(np.outer(u.numpy(), v.numpy()) * s, np.outer(ref_u[:, 0], ref_vt[0]) * ref_s[0],
                                   atol=1e-9 * ref_s[0])
    u, s, v, converged = top_singular_triplet(torch.zeros(4, 6, dtype=torch.float64))
    assert s == 0.0 and converged and not u.any() and not v.any()


def predicted(method, stack: torch.Tensor, steps: np.ndarray, targets: list[float]) -> torch.Tensor:
    """A direct method's predicted deltas of one tensor, dense: targets x the tensor's shape."""
    deltas = StackedDeltas(stack.reshape(len(stack), -1), None, tuple(stack.shape[1:]))
    prediction = method.predict("w", deltas, steps, targets)
    anchor = None if prediction.anchor is None else stack[prediction.anchor].reshape(deltas.shape)
    return torch.stack([prediction.rows(j, 0, deltas.shape[0], anchor).reshape(stack.shape[1:])
                        for j in range(len(targets))])


def test_alpharl_recovers_a_stack_whatever_the_svd_signs(monkeypatch):
    """Per-step SVD signs are arbitrary: the alignment must undo them before the PLS."""
    import relex.methods.alpharl as alpharl

    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    steps = np.array([1.0, 2.0, 4.0, 5.0])
    stack = torch.stack([(0.5 * s + 1.0) * torch.outer(u, v) for s in steps])
    method = AlphaRL(pls_scale=False)
    clean = predicted(method, stack, steps, [10.0, 3.0])
    for j, target in enumerate((10.0, 3.0)):
        torch.testing.assert_close(clean[j], (0.5 * target + 1.0) * torch.outer(u, v), rtol=1e-10, atol=1e-12)

    calls = []
    exact = alpharl.top_singular_triplet

    def flipping(d, start=None, **kwargs):  # every other step's triplet comes back as (-u, s, -v)
        left, s, right, ok = exact(d, None, **kwargs)
        calls.append(1)
        sign = -1.0 if len(calls) % 2 else 1.0
        return sign * left, s, sign * right, ok

    monkeypatch.setattr(alpharl, "top_singular_triplet", flipping)
    a, _ = method.factors("w", StackedDeltas(stack.reshape(len(stack), -1), None, tuple(stack.shape[1:])))
    assert len(set(np.sign(a @ u.numpy()))) == 2  # the raw factors disagree in sign
    torch.testing.assert_close(predicted(method, stack, steps, [10.0, 3.0]), clean, rtol=1e-10, atol=1e-12)
    # a step whose whole delta points the other way looks the same to AlphaRL: each step's basis is
    # re-derived and only the aligned a_t enter the fit (what a shared trajectory basis would see)
    flipped = stack.clone()
    flipped[1] = -flipped[1]
    torch.testing.assert_close(predicted(method, flipped, steps, [10.0]), clean[:1], rtol=1e-10, atol=1e-12)


# -- AlphaRL on real files -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["step", "accuracy"])
def test_alpharl_hits_a_rank1_linear_trajectory(tmp_path, mode):
    base = save_pico_model(tmp_path / "base")
    w0, directions, saved, f = rank1_run(base, tmp_path / "run")
    scores = {s: 0.2 + 0.01 * s for s in [*STEPS, 60]} if mode == "accuracy" else None
    method = AlphaRL(cutoff=13, target=mode, scores=scores).fit(Trajectory.discover(base, tmp_path / "run"))
    [folder] = extrapolate(method, tmp_path / "out", [60], progress=False, cache=False)
    pred = predicted_deltas(folder, base)
    in_scope = [n for n, t in w0.items() if t.dim() == 2 and 18 not in t.shape]
    assert len(in_scope) == 14  # 7 matrices per layer; embeddings and head (vocab 18) are out of scope
    for name in in_scope:
        assert relative_error(pred[name], (f(60) * directions[name]).numpy()) <= 1e-5, name
    reader = CheckpointReader(folder)
    for name in set(w0) - set(in_scope):  # norms, biases, embedding and head stay at the cutoff
        assert torch.equal(reader.read(name), saved[13][name]), name
    meta = json.loads((folder / "relex.json").read_text())
    assert meta["method"] == "alpharl" and meta["params"]["target"] == mode


def test_alpharl_accuracy_mode_needs_scores_for_every_step(pico, tmp_path):
    base, run, _ = pico
    traj = Trajectory.discover(base, run)
    with pytest.raises(RelexError, match="needs --scores"):
        AlphaRL(target="accuracy")
    method = AlphaRL(cutoff=8, target="accuracy", scores={2: 0.1, 3: 0.2, 5: 0.3, 8: 0.4}).fit(traj)
    with pytest.raises(RelexError, match="no accuracy for step 40"):
        extrapolate(method, tmp_path / "out", [40], progress=False, cache=False)
    flat = AlphaRL(cutoff=8, target="accuracy", scores={2: 0.1, 3: 0.1, 5: 0.1, 8: 0.1, 40: 0.5}).fit(traj)
    with pytest.raises(RelexError, match="all equal"):
        extrapolate(flat, tmp_path / "out", [40], progress=False, cache=False)
    assert not (tmp_path / "out").exists()


# -- every method: outputs load in transformers; the command line -----------------------------------
PEER_METHODS = {
    "relex": lambda: Relex(cutoff=8),
    "two-point": lambda: TwoPoint(cutoff=8, norms_from_cutoff=True),
    "expo": lambda: ExPO(alpha=0.3, cutoff=8),
    "alpharl": lambda: AlphaRL(cutoff=8),
    "next": lambda: NExt(cutoff=8, epochs=50),
}


@pytest.mark.parametrize("name", sorted(PEER_METHODS))
def test_outputs_load_in_transformers_with_finite_logits(pico, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, run, _ = pico
    [folder] = extrapolate(PEER_METHODS[name]().fit(Trajectory.discover(base, run)), tmp_path / "out", [30],
                           progress=False, cache=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(folder)("12+3=", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert json.loads((folder / "relex.json").read_text())["method"] == name


CLI_FLAGS = {
    "relex": ["--rank", "2"],
    "two-point": ["--two-point-norms-from-cutoff", "--anchor", "3"],
    "expo": ["--expo-alpha", "0.5"],
    "alpharl": ["--alpharl-target", "accuracy", "--scores", "{scores}", "--no-alpharl-pls-scale"],
    "next": ["--next-horizon", "5", "--next-step-input", "--next-epochs", "50", "--next-lr", "0.01"],
}


@pytest.mark.parametrize("name", sorted(CLI_FLAGS))
def test_cli_extrapolate_with_each_method(pico, tmp_path, name, capsys):
    base, run, _ = pico
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({str(s): 0.1 + 0.02 * s for s in [*STEPS, 40]}))
    flags = [f.format(scores=scores) for f in CLI_FLAGS[name]]
    out = tmp_path / "out"
    code = main(["extrapolate", "--base", str(base), "--run", str(run), "--cutoff", "13", "--target", "40",
                 "--out", str(out), "--method", name, "--no-cache", "-q", *flags])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "step-40" / "relex.json").read_text())
    assert meta["method"] == name and meta["target"] == 40
    expected = {"relex": {"rank": 2}, "two-point": {"anchor": 3, "norms_from_cutoff": True},
                "expo": {"alpha": 0.5}, "alpharl": {"target": "accuracy", "pls_scale": False},
                "next": {"horizon": 5, "step_input": True, "epochs": 50, "lr": 0.01}}[name]
    assert expected.items() <= meta["params"].items()


def test_every_method_is_registered_and_tested_from_the_cli():
    assert set(METHODS) >= {"relex", "two-point", "expo", "alpharl", "next"}
    assert set(CLI_FLAGS) <= set(METHODS)


def test_cli_refuses_bad_peer_input(pico, tmp_path, capsys):
    base, run, _ = pico
    common = ["extrapolate", "--base", str(base), "--run", str(run), "--out", str(tmp_path / "o"), "--no-cache", "-q"]
    assert main([*common, "--method", "expo", "--target", "20", "--target", "30"]) == 2
    assert "identical copies" in capsys.readouterr().err
    assert main([*common, "--method", "alpharl", "--alpharl-target", "accuracy", "--target", "20"]) == 2
    assert "needs --scores" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main([*common, "--method", "alpharl", "--alpharl-target", "accuracy", "--scores", str(bad),
                 "--target", "20"]) == 2
    assert "expected an object" in capsys.readouterr().err
    # the report's layout {"real": {...}, "relex": {...}} is read too: its measured series
    report_style = tmp_path / "report.json"
    report_style.write_text(json.dumps({"real": {"2": 0.1, "3": 0.2}, "relex": {"30": 0.9}}))
    assert load_scores(report_style) == {2: 0.1, 3: 0.2}
    assert not (tmp_path / "o").exists()


def test_gram_stats_carry_the_tensor_name(pico):
    base, run, _ = pico
    stats = compute_stats(Trajectory.discover(base, run), progress=False, cache=False)
    assert all(s.name == n for n, s in stats.items())
    assert stats["model.norm.weight"].shape == (16,)
    sub = stats["model.norm.weight"].subset([2, 5])
    assert sub.name == "model.norm.weight" and sub.shape == (16,)
    m = np.arange(6.0).reshape(2, 3)
    assert TensorStats(np.array([1.0, 2.0]), gram_of(torch.from_numpy(m)).numpy()).name is None


class RowSplit:
    """A dense matrix visited three rows at a time, as the row-block iteration sees a tensor over the budget."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.shape, self.device = values, tuple(values.shape), values.device

    def row_blocks(self):
        for r0 in range(0, self.shape[0], 3):
            yield r0, min(r0 + 3, self.shape[0]), self.values[r0:r0 + 3]


def test_top_singular_triplet_over_row_blocks_matches_the_dense_one():
    gen = torch.Generator().manual_seed(2)
    for shape in ((31, 20), (7, 40), (2, 9)):
        d = torch.randn(shape, generator=gen, dtype=torch.float64)
        d += 3 * torch.outer(torch.randn(shape[0], generator=gen, dtype=torch.float64),
                             torch.randn(shape[1], generator=gen, dtype=torch.float64))
        u, s, v, ok = top_singular_triplet(d)
        bu, bs, bv, bok = top_singular_triplet(RowSplit(d))
        assert ok and bok and abs(bs - s) <= 1e-12 * s
        torch.testing.assert_close(bu, u, rtol=0, atol=1e-10)
        torch.testing.assert_close(bv, v, rtol=0, atol=1e-10)
    u, s, v, ok = top_singular_triplet(RowSplit(torch.zeros(5, 4, dtype=torch.float64)))
    assert ok and s == 0.0 and not u.any() and not v.any()


@pytest.mark.parametrize("name", ["alpharl", "next"])
def test_direct_methods_under_a_tiny_budget_work_in_row_blocks_with_equal_results(tmp_path, name):
    """A tensor that fits the budget is read as one stack; under a tiny budget every triplet sums its products
    over row blocks read from the files and the prediction is written a block at a time: the same factors
    (to rounding) and the same weights."""
    base = save_pico_model(tmp_path / "base")
    rank1_run(base, tmp_path / "run")
    traj = Trajectory.discover(base, tmp_path / "run")
    method = PEER_METHODS[name]().fit(traj, progress=False)
    [whole] = extrapolate(method, tmp_path / "whole", [30], progress=False, cache=False)
    if name == "next":  # NExt reads the deltas while fitting: under the budget too
        tiny = PEER_METHODS[name]().fit(traj, progress=False, memory_budget="1KB")
        for tensor, factors in method.predicted_.items():
            for role, row in factors.items():
                torch.testing.assert_close(tiny.predicted_[tensor][role], row, rtol=1e-5, atol=1e-9)
        method = tiny
    else:
        name_2d = "model.layers.0.mlp.up_proj.weight"
        stack = torch.stack([CheckpointReader(c.path).read(name_2d).double() for c in traj.checkpoints])
        w0 = CheckpointReader(base).read(name_2d).double()
        dense = method.factors(name_2d, StackedDeltas((stack - w0).reshape(len(stack), -1), None, tuple(w0.shape)))
        rows = method.factors(name_2d, traj.deltas(name_2d, block_bytes=1024))
        np.testing.assert_allclose(rows[0], dense[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rows[1], dense[1], rtol=1e-10, atol=1e-12)
    [blocks] = extrapolate(method, tmp_path / "blocks", [30], memory_budget="1KB", progress=False, cache=False)
    a, b = CheckpointReader(whole), CheckpointReader(blocks)
    for tensor in a.specs:
        torch.testing.assert_close(b.read(tensor), a.read(tensor), rtol=1e-6, atol=1e-9, msg=tensor)


def test_read_deltas_are_stacked_once_when_they_fit(tmp_path):
    """NExt's triplets visit a tensor's rows many times: read once into a stack when it fits the budget, the same
    deltas bit for bit; over the budget, still read by row blocks at every visit (``whole`` gathers them right:
    it once returned the last block's rows over and over, each block's views being the next one's buffer)."""
    base = save_pico_model(tmp_path / "base")
    rank1_run(base, tmp_path / "run")
    traj = Trajectory.discover(base, tmp_path / "run")
    name = "model.layers.0.mlp.up_proj.weight"
    rows = traj.deltas(name, block_bytes=1024)
    assert rows.stacked() is rows
    stacked = traj.deltas(name, 1 << 26).stacked()
    assert isinstance(stacked, StackedDeltas) and len(stacked) == len(rows) == len(traj.checkpoints)
    for t in range(len(rows)):
        torch.testing.assert_close(stacked.whole(t), rows.whole(t), rtol=0, atol=0)
