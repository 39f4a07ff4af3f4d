"""PEFT LoRA adapter checkpoints read as full-weight deltas, checked against PEFT's own merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_pico_model
from relex import NExt, Relex, RelexError, Trajectory, TwoPoint, extrapolate
from relex.trajectory import AdapterReader, CheckpointReader
from relex.trajectory.peft import is_adapter_folder, pattern_key

peft = pytest.importorskip("peft")

STEPS = [2, 4, 7]
PLAIN = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
         "modules_to_save": ["lm_head"]}
RSLORA = {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "up_proj"],
          "bias": "all"}
PATTERNS = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj"],
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "gate_proj": 3},
            "alpha_pattern": {"v_proj": 3, "model.layers.0.self_attn.k_proj": 20}}
BIAS = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "lora_bias": True}


def lora_run(tmp_path, config: dict, steps=STEPS):
    """A TRL-style LoRA run: checkpoint-N/ holding only the adapter, plus PEFT's merged weights per step."""
    from transformers import AutoModelForCausalLM

    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    merged, factors = {}, {}
    gen = torch.Generator().manual_seed(5)
    directions = None
    for step in steps:
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**config))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if directions is None:
            directions = {n: (torch.randn(p.shape, generator=gen), torch.randn(p.shape, generator=gen))
                          for n, p in trainable.items()}
        with torch.no_grad():  # a smooth drift of every trainable tensor (LoRA factors, modules_to_save)
            for n, p in trainable.items():
                start, drift = directions[n]
                p.copy_((p if "modules_to_save" in n else 0.1 * start) + 0.02 * step * drift)
        model.save_pretrained(run / f"checkpoint-{step}")
        factors[step] = {n: p.detach().clone() for n, p in trainable.items()}
        merged[step] = {n: t.detach().clone() for n, t in model.merge_and_unload().state_dict().items()}
    return base, run, merged, factors


def check_against_merge(base, run, merged, rtol=1e-5, atol=1e-6):
    w0 = load_file(str(base / "model.safetensors"))
    base_reader = CheckpointReader(base)
    moved = set()
    for step, weights in merged.items():
        folder = run / f"checkpoint-{step}"
        assert is_adapter_folder(folder)
        reader = AdapterReader(folder, base_reader)
        assert reader.specs == base_reader.specs
        for name in w0:
            delta = reader.read_delta(name)
            assert delta.dtype == torch.float64 and delta.shape == w0[name].shape
            torch.testing.assert_close(delta, weights[name].double() - w0[name].double(), rtol=rtol, atol=atol)
            torch.testing.assert_close(reader.read(name, 3, 9), weights[name][3:9].double(), rtol=rtol, atol=atol)
            if delta.any():
                moved.add(name)
    return moved


def test_plain_lora_with_embedding_and_modules_to_save(tmp_path):
    base, run, merged, factors = lora_run(tmp_path, PLAIN)
    moved = check_against_merge(base, run, merged)
    assert moved == {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    # exact: the delta is B @ A * alpha / r in float64, from the adapter's own factors
    reader = AdapterReader(run / "checkpoint-7", CheckpointReader(base))
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    a, b = factors[7][f"{prefix}.lora_A.default.weight"], factors[7][f"{prefix}.lora_B.default.weight"]
    exact = b.double() @ a.double() * (8 / 4)
    assert torch.equal(reader.read_delta("model.layers.1.self_attn.q_proj.weight"), exact)
    into = torch.full((exact.numel(),), float("nan"), dtype=torch.float64)  # the engine's flat row buffer
    result = reader.read_delta("model.layers.1.self_attn.q_proj.weight", out=into)
    assert result.data_ptr() == into.data_ptr() and torch.equal(result.view(exact.shape), exact)  # computed in place
    frozen = "model.layers.0.self_attn.k_proj.weight"
    assert not reader.read_delta(frozen, out=torch.full_like(reader.read_delta(frozen), 7.0).view(-1)).any()
    torch.testing.assert_close(reader.read_delta("model.layers.1.self_attn.q_proj.weight", 5, 9), exact[5:9],
                               rtol=0, atol=1e-15)
    emb_a = factors[7]["base_model.model.model.embed_tokens.lora_embedding_A.default"]
    emb_b = factors[7]["base_model.model.model.embed_tokens.lora_embedding_B.default"]
    torch.testing.assert_close(reader.read_delta("model.embed_tokens.weight", 4, 10),
                               (emb_b.double() @ emb_a.double()).T[4:10] * 2, rtol=0, atol=1e-15)
    assert not reader.read_delta("model.layers.0.self_attn.k_proj.weight").any()  # not adapted: zero delta


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    base, run, merged, factors = lora_run(tmp_path, RSLORA, steps=[3])
    moved = check_against_merge(base, run, merged)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"} <= moved  # bias="all"
    reader = AdapterReader(run / "checkpoint-3", CheckpointReader(base))
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    a, b = factors[3][f"{prefix}.lora_A.default.weight"], factors[3][f"{prefix}.lora_B.default.weight"]
    assert torch.equal(reader.read_delta("model.layers.0.mlp.up_proj.weight"), b.double() @ a.double() * (6 / 2.0))


def test_rank_and_alpha_patterns(tmp_path):
    base, run, merged, _ = lora_run(tmp_path, PATTERNS, steps=[3])
    check_against_merge(base, run, merged)
    reader = AdapterReader(run / "checkpoint-3", CheckpointReader(base))
    scales = reader.scales
    assert scales["model.layers.1.self_attn.q_proj.weight"] == 8 / 2      # rank_pattern
    assert scales["model.layers.0.self_attn.q_proj.weight"] == 8 / 4
    assert scales["model.layers.0.mlp.gate_proj.weight"] == 8 / 3         # rank_pattern by suffix
    assert scales["model.layers.1.self_attn.v_proj.weight"] == 3 / 4      # alpha_pattern by suffix
    assert scales["model.layers.0.self_attn.k_proj.weight"] == 20 / 4     # alpha_pattern by full name
    assert scales["model.layers.1.self_attn.k_proj.weight"] == 8 / 4
    assert pattern_key(["v_proj"], "model.layers.0.self_attn.v_proj") == "v_proj"
    assert pattern_key(["proj"], "model.layers.0.self_attn.v_proj") is None  # whole module-name parts only


def test_lora_bias(tmp_path):
    base, run, merged, _ = lora_run(tmp_path, BIAS, steps=[3])
    moved = check_against_merge(base, run, merged)
    assert {f"model.layers.{i}.self_attn.{m}.{p}" for i in (0, 1) for m in ("q_proj", "v_proj")
            for p in ("weight", "bias")} == moved


def test_engine_on_a_lora_run_writes_full_merged_models(tmp_path):
    from transformers import AutoModelForCausalLM

    base, run, merged, _ = lora_run(tmp_path, PLAIN)
    traj = Trajectory.discover(base, run)
    assert [type(traj.reader(c.path)) for c in traj.checkpoints] == [AdapterReader] * 3
    # two-point at the cutoff itself is W_0 + Delta_cut: PEFT's merged model of that checkpoint
    [folder] = extrapolate(TwoPoint(cutoff=7).fit(traj), tmp_path / "tp", [7], progress=False, cache=False)
    out = CheckpointReader(folder)
    assert set(out.specs) == set(merged[7])
    for name, tensor in merged[7].items():
        torch.testing.assert_close(out.read(name), tensor, rtol=1e-6, atol=1e-7)
    [folder] = extrapolate(Relex(cutoff=7).fit(traj), tmp_path / "relex", [20], progress=False,
                           cache=tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    frozen = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(CheckpointReader(folder).read(frozen), load_file(str(base / "model.safetensors"))[frozen])
    # the statistics cache is keyed on the adapter's config too: a changed alpha is not served stale
    fingerprint = traj.reader(run / "checkpoint-7").fingerprint()
    assert any(path.endswith("adapter_config.json") for path, *_ in fingerprint)


def test_next_on_a_lora_run_learns_only_the_adapted_tensors(tmp_path):
    base, run, merged, _ = lora_run(tmp_path, PLAIN)
    method = NExt(epochs=30).fit(Trajectory.discover(base, run), progress=False)
    moved = {n for n, t in merged[7].items() if not torch.equal(t, load_file(str(base / "model.safetensors"))[n])}
    assert set(method.predicted_) == moved
    [folder] = extrapolate(method, tmp_path / "out", [12], progress=False, cache=False)
    frozen = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(CheckpointReader(folder).read(frozen), load_file(str(base / "model.safetensors"))[frozen])


def test_lora_deltas_give_their_triplets_from_the_factors(tmp_path):
    """A LoRA delta, and a difference of two, is left @ right; its triplet from the factors equals the row-block
    iteration's on the delta read as rows (same s; the same s u v^T up to the iteration's tolerance)."""
    from relex.methods.triplet import DeltaDifference, DenseMatrix, top_singular_triplet

    base, run, _, _ = lora_run(tmp_path, PLAIN)
    traj = Trajectory.discover(base, run)
    base_reader = traj.reader(base)
    last = traj.reader(run / "checkpoint-7")
    assert last.delta_factors("lm_head.weight") is None             # modules_to_save: a whole saved value
    assert last.delta_factors("model.embed_tokens.weight") is None  # PEFT saved the adapted embedding's weight too
    assert last.delta_factors("model.norm.weight") is None          # 1-D
    left, right = last.delta_factors("model.layers.0.self_attn.k_proj.weight")  # not adapted: rank 0
    assert left.shape[1] == 0 and right.shape[0] == 0
    checked = 0
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight"):
        deltas = traj.deltas(name, 1 << 20)
        left, right = deltas.factors(2)
        torch.testing.assert_close(left @ right, last.read_delta(name), rtol=0, atol=1e-14)
        for later, earlier in ((2, None), (1, None), (2, 0), (2, 1)):
            pair = DeltaDifference(deltas, later, earlier)
            assert pair.factors() is not None
            dense = deltas.whole(later) - (deltas.whole(earlier) if earlier is not None else 0)
            u, s, v, ok = top_singular_triplet(pair)
            ref_u, ref_s, ref_v, ref_ok = top_singular_triplet(DenseMatrix(dense))
            assert ok and ref_ok and abs(s - ref_s) <= 1e-9 * max(ref_s, 1e-300)
            torch.testing.assert_close(torch.outer(u, v) * s, torch.outer(ref_u, ref_v) * ref_s, rtol=0,
                                       atol=1e-8 * max(ref_s, 1e-300))
            checked += s > 0
    assert checked == 8  # two adapted tensors, four differences each (k_proj's are zero)
    assert base_reader.delta_factors("model.embed_tokens.weight") is None  # whole weights: no factors


def test_full_checkpoints_keep_the_plain_reader(pico):
    base, run, _ = pico
    folder = run / "checkpoint-5"
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert not is_adapter_folder(folder)  # full weights beside an adapter config win
    assert type(Trajectory.discover(base, run).reader(folder)) is CheckpointReader


def test_bad_adapters_are_refused(tmp_path):
    base, run, _, _ = lora_run(tmp_path, RSLORA, steps=[3])
    folder = run / "checkpoint-3"
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base_reader = CheckpointReader(base)
    for change, message in (({"use_dora": True}, "use_dora is not supported"),
                            ({"peft_type": "IA3"}, "peft_type IA3"),
                            ({"r": 8}, "has rank 4, adapter_config.json says 8")):
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(RelexError, match=message):
            AdapterReader(folder, base_reader)
    config_path.write_text(json.dumps(config))
    weights = folder / "adapter_model.safetensors"
    prefix = "base_model.model.model.layers.0.self_attn"
    for tensors, message in (
            ({f"{prefix}.nope.lora_A.weight": torch.zeros(4, 16), f"{prefix}.nope.lora_B.weight": torch.zeros(16, 4)},
             "matches no tensor of the base"),
            ({f"{prefix}.q_proj.lora_A.weight": torch.zeros(4, 16),
              f"{prefix}.q_proj.lora_B.weight": torch.zeros(9, 4)},
             "do not make the base tensor's shape"),
            ({f"{prefix}.q_proj.lora_A.weight": torch.zeros(4, 16)}, "only one of its LoRA factors"),
            ({"base_model.model.lm_head.weight": torch.zeros(3, 3)}, "has shape")):
        save_file(tensors, str(weights))
        with pytest.raises(RelexError, match=message):
            AdapterReader(folder, base_reader)
    weights.write_bytes(b"garbage")
    with pytest.raises(RelexError, match="corrupt or truncated adapter"):
        AdapterReader(folder, base_reader)


def test_fan_in_fan_out_conv1d_layers(tmp_path):
    """GPT-2's Conv1D stores weights as (in, out): PEFT merges (B @ A)^T there."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=18, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(base)
    model = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(base),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape))
    model.save_pretrained(tmp_path / "ckpt")
    merged = model.merge_and_unload().state_dict()
    w0 = load_file(str(base / "model.safetensors"))
    reader = AdapterReader(tmp_path / "ckpt", CheckpointReader(base))
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert w0[name].shape[0] == 16  # (in, out)
        expected = merged[name][2:11].double() - w0[name][2:11].double()
        torch.testing.assert_close(reader.read_delta(name, 2, 11), expected, rtol=1e-5, atol=1e-6)
        left, right = reader.delta_factors(name)  # the transposed product's factors, rows x r times r x out
        torch.testing.assert_close(left @ right, reader.read_delta(name), rtol=0, atol=1e-12)
