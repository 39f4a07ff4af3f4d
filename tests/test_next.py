"""NExt: factors, the default horizon, a learned predictor that hits an exactly linear rank-1 trajectory."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import rank1_run, save_pico_model
from relex import NExt, RelexError, Trajectory, extrapolate
from relex.cli import main
from relex.methods.next import _Predictor, default_horizon, predictor_parameters, rank1
from relex.trajectory import CheckpointReader

REGULAR = list(range(1, 13))


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """W_t = W_0 + 0.05 t u v^T per matrix (W_0 + 0.05 t d per vector) at steps 1..12, and its truth."""
    tmp = tmp_path_factory.mktemp("next")
    base = save_pico_model(tmp / "base")
    w0, directions, _, f = rank1_run(base, tmp / "run", steps=REGULAR, offset=0.0)
    return base, tmp / "run", w0, directions, f


def test_default_horizon_is_a_third_of_the_window_with_pairs() -> None:
    assert default_horizon(list(range(1, 46))) == 15
    assert default_horizon([2, 3, 5, 8, 13]) == 3  # 5 - 2 and 8 - 5; a third of the window is 3.7
    assert default_horizon([10, 20]) == 10  # one pair is all two checkpoints can give
    with pytest.raises(RelexError, match="at least two"):
        default_horizon([7])


def test_rank1_signs_follow_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    d = torch.outer(torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen,
                                                                                    dtype=torch.float64))
    u, s, v = rank1(d)
    torch.testing.assert_close(s * torch.outer(u, v), d)
    flipped = rank1(d, (-u, s, -v))
    torch.testing.assert_close(flipped[0], -u)
    torch.testing.assert_close(flipped[2], -v)
    assert float(v[int(v.abs().argmax())]) > 0  # no reference: the largest entry of v is positive


@pytest.mark.parametrize("step_input", [False, True])
def test_linear_rank1_trajectory_is_learned(linear_run, tmp_path, step_input) -> None:
    base, run, w0, directions, f = linear_run
    method = NExt(step_input=step_input, epochs=400).fit(Trajectory.discover(base, run), progress=False)
    assert method.horizon_ == 4 and method.params()["horizon"] == 4
    [folder] = extrapolate(method, tmp_path / "out", [40], progress=False, cache=False)
    out = CheckpointReader(folder)
    for name, t in w0.items():
        truth = f(40) * directions[name]
        error = (out.read(name).double() - t.double() - truth).norm() / truth.norm()
        assert error < 0.05, name
    meta = json.loads((folder / "relex.json").read_text())
    assert meta["method"] == "next" and meta["params"]["step_input"] is step_input


def test_same_seed_same_weights_and_target_at_cutoff_is_the_cutoff(linear_run, tmp_path) -> None:
    base, run, *_ = linear_run
    traj = Trajectory.discover(base, run)
    a = NExt(cutoff=8, epochs=50).fit(traj, progress=False)
    b = NExt(cutoff=8, epochs=50).fit(traj, progress=False)
    for name, factors in a.predicted_.items():
        for role, row in factors.items():
            assert torch.equal(row, b.predicted_[name][role])
    [at_cut] = extrapolate(a, tmp_path / "cut", [8], progress=False, cache=False)
    real = load_file(str(run / "checkpoint-8" / "model.safetensors"))
    out = CheckpointReader(at_cut)
    for name, tensor in real.items():
        torch.testing.assert_close(out.read(name), tensor)


def test_untouched_tensors_keep_their_value(tmp_path) -> None:
    """A tensor that never moves (outside a LoRA's targets, say) has no factors and stays at W_0."""
    from safetensors.torch import save_file

    base = save_pico_model(tmp_path / "base")
    w0 = load_file(str(base / "model.safetensors"))
    frozen = "model.layers.0.self_attn.k_proj.weight"
    for step in (1, 2, 3, 4):
        tensors = {n: (t + 0.01 * step if n != frozen else t).contiguous() for n, t in w0.items()}
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(tensors, str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    method = NExt(epochs=20).fit(Trajectory.discover(base, tmp_path / "run"), progress=False)
    assert frozen not in method.predicted_
    [folder] = extrapolate(method, tmp_path / "out", [9], progress=False, cache=False)
    assert torch.equal(CheckpointReader(folder).read(frozen), w0[frozen])


def test_bad_next_input_is_refused(linear_run, tmp_path, capsys) -> None:
    base, run, *_ = linear_run
    traj = Trajectory.discover(base, run)
    with pytest.raises(RelexError, match="no two observed steps are 20 apart"):
        NExt(horizon=20).fit(traj, progress=False)
    with pytest.raises(RelexError, match="positive"):
        NExt(horizon=0)
    method = NExt(cutoff=8, epochs=5).fit(traj, progress=False)
    with pytest.raises(RelexError, match="before it"):
        extrapolate(method, tmp_path / "out", [5], progress=False, cache=False)
    code = main(["extrapolate", "--base", str(base), "--run", str(run), "--method", "next", "--next-horizon", "99",
                 "--target", "30", "--out", str(tmp_path / "cli"), "--no-cache", "-q"])
    assert code == 2 and "no two observed steps are 99 apart" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_predictor_memory_beyond_the_budget_is_said(linear_run, caplog) -> None:
    """The predictors' training state is the method's own, outside --memory-budget: a run is told when it is larger."""
    base, run, *_ = linear_run
    traj = Trajectory.discover(base, run)
    for dim, step_input in [(5, False), (64, True)]:
        module = _Predictor(dim, 256, step_input)
        assert predictor_parameters(dim, 256, step_input) == sum(p.numel() for p in module.parameters())
    with caplog.at_level(logging.WARNING, logger="relex"):
        NExt(epochs=5).fit(traj, progress=False)
    assert "beyond --memory-budget" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="relex"):
        NExt(epochs=5).fit(traj, progress=False, memory_budget="64KB")
    assert "predictor for length" in caplog.text and "beyond --memory-budget 64" in caplog.text
