"""--verify --backend vllm: the weights handed to the engine, the in-place load and prefix-cache reset, the refusal
where vLLM or a GPU is missing, and (where vLLM runs: a CUDA GPU, or its CPU build) the real engine against
transformers."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from relex.errors import RelexError
from relex.eval.vllm_engine import VllmEngine, vllm_cpu_build
from relex.verify import Candidate, ModelScorer, VllmScorer, verify
from test_verify import answer_run

GRADER = "test_verify:exact_match"
HAS_VLLM = importlib.util.find_spec("vllm") is not None and (torch.cuda.is_available() or vllm_cpu_build())


class TransformersEngine:
    """What VllmScorer asks of its engine (``dtype``, ``load``, ``generate``), played by a transformers model; it
    keeps a copy of every set of pairs it is handed."""

    def __init__(self, base) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.dtype = torch.float32
        self.handed: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def load(self, pairs) -> None:
        pairs = {name: tensor.clone() for name, tensor in pairs}
        self.handed.append(pairs)
        for name, tensor in pairs.items():
            self.model.get_parameter(name).copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens):
        outs = []
        for ids in prompts:
            x = torch.tensor([ids])
            y = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=1)
            outs.append(y[0, len(ids):].tolist())
        return outs


def fitted(tmp_path, **run):
    """(trajectory, method, stats, items, target) of answer_run's pico run, fitted with relex."""
    from relex.eval.dataset import read_dataset
    from relex.materialize import compute_stats
    from relex.methods import METHODS
    from relex.trajectory import Trajectory

    base, run_dir, data, target = answer_run(tmp_path, gain=True, **run)
    trajectory = Trajectory.discover(base, run_dir).observed(None)
    method = METHODS["relex"]().fit(trajectory, progress=False)
    return trajectory, method, compute_stats(trajectory, cache=False, progress=False), read_dataset(data), target


def test_the_pairs_handed_to_vllm_are_the_weights_the_transformers_scorer_holds(tmp_path, monkeypatch):
    import relex.eval.vllm_engine as vllm_engine

    trajectory, method, stats, items, target = fitted(tmp_path)
    engine = TransformersEngine(trajectory.base)
    monkeypatch.setattr(vllm_engine, "open_engine", lambda model, tokenizer: engine)
    hf = ModelScorer(trajectory, method, stats, items, max_new_tokens=1, grader=GRADER)
    vs = VllmScorer(trajectory, method, stats, items, max_new_tokens=1, grader=GRADER)
    floating = {n for n, s in hf.loader.specs.items() if s.dtype.is_floating_point and s.numel}
    held = dict(hf.model.named_parameters(remove_duplicate=False))
    idx = np.arange(len(items))
    cands = [Candidate(target, 1.0), None, Candidate(target // 2, 0.5)]
    for c in cands:
        got = vs(c, idx)
        assert np.array_equal(vs(c, idx), got)  # scored once: no second load
        hf.load(hf.weights(c))
        handed = engine.handed[-1]
        assert set(handed) == floating
        for name, tensor in handed.items():
            assert tensor.dtype == held[name].dtype and torch.equal(tensor, held[name]), name
        assert np.array_equal(got, hf(c, idx)), c
    assert len(engine.handed) == len(cands)
    far, incumbent = engine.handed[0], engine.handed[1]
    assert not torch.equal(far["lm_head.weight"], incumbent["lm_head.weight"])  # the candidates differ where they move


class LoadingModel(torch.nn.Module):
    """A stand-in for a vLLM model: ``load_weights`` records the pairs (drawing the generator it is given)."""

    def __init__(self, log: list, fail: Exception | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.log, self.fail = log, fail

    def load_weights(self, weights) -> None:
        if self.fail is not None:
            raise self.fail
        self.log.append(("load", [(name, tensor.device) for name, tensor in weights]))


def fake_llm(log: list, deeper: bool = False, reset: bool = True, fail: Exception | None = None,
             reloads: bool = False):
    """An ``LLM`` with its model where TRL reaches it (``driver_worker.model_runner``) or one wrapper deeper; with
    ``reloads``, its worker has vLLM >= 0.16's ``reload_weights(weights_iterator=...)``, which loads through the
    model (and would then rerun each layer's post-load processing)."""
    model = LoadingModel(log, fail)

    def reload_weights(weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        log.append(("reload", is_checkpoint_format))
        model.load_weights(weights_iterator)

    runner = SimpleNamespace(model=model, **({"reload_weights": reload_weights} if reloads else {}))
    worker = SimpleNamespace(model_runner=runner, **({"reload_weights": reload_weights} if reloads else {}))
    if deeper:
        worker = SimpleNamespace(worker=worker)
    return SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker)),
                           reset_prefix_cache=lambda: log.append(("reset",)) or reset)


@pytest.mark.parametrize("deeper", [False, True], ids=["trl-chain", "worker-wrapper-chain"])
def test_engine_loads_in_place_then_resets_the_prefix_cache(deeper):
    log = []
    engine = VllmEngine(fake_llm(log, deeper))
    engine.load([("a.weight", torch.ones(3)), ("b.bias", torch.ones(1))])
    assert log == [("load", [("a.weight", torch.device("cpu")), ("b.bias", torch.device("cpu"))]), ("reset",)]
    assert engine.dtype == torch.float32


def test_engine_reloads_through_the_worker_where_vllm_can():
    log = []
    engine = VllmEngine(fake_llm(log, reloads=True))
    engine.load([("a.weight", torch.ones(3))])
    assert log == [("reload", True), ("load", [("a.weight", torch.device("cpu"))]), ("reset",)]
    broken = VllmEngine(fake_llm([], fail=KeyError("x.weight"), reloads=True))
    with pytest.raises(RelexError, match=r"refused a candidate's weights \(KeyError"):
        broken.load([("x.weight", torch.ones(1))])
    with pytest.raises(RelexError, match="half-loaded"):  # vLLM's layer-wise reload state is not trusted again
        broken.load([("a.weight", torch.ones(1))])


def test_reload_needs_pairs_by_name_on_both_the_runner_and_the_worker():
    from relex.eval.vllm_engine import reloads_in_place

    def new(weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        pass

    def forwarding(*args, **kwargs):
        pass

    def old():  # vLLM < 0.16: re-reads the model folder
        pass

    worker = lambda runner, own: SimpleNamespace(model_runner=SimpleNamespace(reload_weights=runner),  # noqa: E731
                                                 reload_weights=own)
    assert reloads_in_place(worker(new, forwarding)) and reloads_in_place(worker(new, new))
    assert not reloads_in_place(worker(old, forwarding)) and not reloads_in_place(worker(new, old))
    assert not reloads_in_place(SimpleNamespace(model_runner=SimpleNamespace()))


def test_engine_errors_are_one_line():
    with pytest.raises(RelexError, match="out of this process's reach"):
        VllmEngine(SimpleNamespace(llm_engine=SimpleNamespace()))
    with pytest.raises(RelexError, match="kept its prefix cache"):
        VllmEngine(fake_llm([], reset=False)).load([("a.weight", torch.ones(1))])
    with pytest.raises(RelexError, match=r"refused a candidate's weights \(KeyError: 'x.weight'\)"):
        VllmEngine(fake_llm([], fail=KeyError("x.weight"))).load([("x.weight", torch.ones(1))])


def test_backend_vllm_is_refused_in_one_line_without_vllm_or_a_gpu(tmp_path, monkeypatch, capsys):
    from test_verify import verify_cli

    import relex.eval.vllm_engine as vllm_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_engine, "vllm_cpu_build", lambda: False)
    base, run, data, target = answer_run(tmp_path, gain=True, n=8)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:  # refused as it is parsed, before any checkpoint is read
        verify_cli(base, run, data, out, "--target", str(target), "--backend", "vllm")
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("relex: error: argument --backend: vllm needs the vllm package and a CUDA GPU")
    assert not out.exists()


def test_backend_without_verify_is_refused():
    from argparse import Namespace

    from relex.verify import verify_options

    with pytest.raises(RelexError, match="pass --verify"):
        verify_options(Namespace(verify=None, backend="vllm"))


def save_wide_model(folder):
    """answer_run's base with vLLM-sized attention heads (head dim 64; the pico model's 4 is below vLLM's kernels')."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import make_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=18, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm with a CUDA GPU, or vLLM's CPU build (vllm-cpu)")
def test_vllm_engine_reloads_in_place_and_scores_like_transformers(tmp_path):
    trajectory, method, stats, items, target = fitted(tmp_path, base_model=save_wide_model)
    vs = VllmScorer(trajectory, method, stats, items, max_new_tokens=1, grader=GRADER)
    hf = ModelScorer(trajectory, method, stats, items, max_new_tokens=1, grader=GRADER)
    idx, far = np.arange(len(items)), Candidate(target, 1.0)
    stop = vs(None, idx)
    moved = vs(far, idx)
    assert moved.mean() > stop.mean() + 0.3  # the engine answers with the candidate's weights
    vs.seen.clear()
    assert np.array_equal(vs(None, idx), stop)  # back to the incumbent: in place, no stale KV blocks
    assert (vs(far, idx) == hf(far, idx)).mean() >= 0.9  # the engine's precision (bf16/fp16) against fp32
    verdict = verify([Candidate(t, s) for t in (8, target) for s in (0.5, 1.0)], vs, len(items), seed=0)
    assert verdict.published and verdict.confirmation[0] > 0.3, verdict.summary()
