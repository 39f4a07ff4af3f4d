"""Issue 28's hostile inputs: paths read from a model folder's files, links, JSON side files, pickles, adapters.

Each refusal is one line naming the file (and key) at fault, exit code 2, nothing published, no temporary
left, and nothing written outside the output folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import drift_run, save_pico_model
from relex import RelexError, Trajectory
from relex.cli import main
from relex.safeio import MAX_JSON_BYTES, inside
from relex.trajectory import AdapterReader, CheckpointReader
from relex.trajectory.peft import pattern_key

NAME = "model.layers.0.mlp.up_proj.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".relex-" in p.name]


@pytest.fixture
def extrapolate(pico, tmp_path, capsys):
    """``relex extrapolate --target 30`` in-process on the pico run; ``expect=2`` checks the whole refusal."""
    base, run, _ = pico

    def call(*extra, expect: int = 0) -> str:
        out = tmp_path / "out"
        before = set(out.rglob("*")) if out.exists() else set()
        code = main(["extrapolate", "-q", "--no-cache", "--base", str(base), "--run", str(run), "--out", str(out),
                     "--target", "30", *map(str, extra)])
        err = capsys.readouterr().err.strip()
        assert code == expect, err
        if expect == 2:
            lines = [line for line in err.splitlines() if not line.startswith("relex: WARNING")]
            assert len(lines) == 1 and lines[0].startswith("relex: error: "), err
            assert (set(out.rglob("*")) if out.exists() else set()) == before
            assert not hidden(tmp_path)
        return err

    return call


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# 1. auto_map naming a module outside the base ---------------------------------------------------------
@pytest.mark.parametrize("ref", ["../evil.Cls", "someone/repo--../evil.Cls", "/{tmp}/evil.Cls"])
def test_auto_map_outside_the_base_is_refused_and_nothing_written(extrapolate, pico, tmp_path, ref):
    base, _, _ = pico
    (tmp_path / "evil.py").write_text("import os  # attacker's\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "evil.py").write_text("# the user's own file\n")
    edit_json(base / "config.json", auto_map={"AutoModel": ref.format(tmp=str(tmp_path).strip("/"))})
    err = extrapolate(expect=2)
    assert "config.json: auto_map['AutoModel'] names" in err and "outside" in err
    assert (tmp_path / "out" / "evil.py").read_text() == "# the user's own file\n"


# 2. side files linked out of the base -----------------------------------------------------------------
def test_side_files_linked_out_of_the_base_are_refused(extrapolate, pico, tmp_path):
    base, _, _ = pico
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(secret)
    err = extrapolate(expect=2)
    assert "tokenizer.json: links to" in err and "outside" in err


def test_side_files_linked_within_the_base_are_copied_as_contents(extrapolate, pico, tmp_path):
    base, _, _ = pico
    (base / "shared").mkdir()
    os.replace(base / "tokenizer.json", base / "shared" / "tokenizer.json")
    (base / "shared" / "tokenizer.json").chmod(0o600)
    (base / "tokenizer.json").symlink_to("shared/tokenizer.json")
    (base / "modeling_pico.py").symlink_to(base / "shared" / "tokenizer.json")  # any regular file will do
    edit_json(base / "config.json", auto_map={"AutoModel": "modeling_pico.PicoModel"})
    extrapolate()
    for name in ("tokenizer.json", "modeling_pico.py"):
        copy = tmp_path / "out" / "step-30" / name
        assert not copy.is_symlink() and copy.read_bytes() == (base / "shared" / "tokenizer.json").read_bytes()
        umask = os.umask(0)
        os.umask(umask)
        assert copy.stat().st_mode & 0o777 == 0o666 & ~umask  # contents copied, not the 0600 mode


def test_hf_cache_snapshot_links_into_its_blobs(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/f00d")
    assert inside(snapshot, "tokenizer.json") == snapshot / "tokenizer.json"
    assert inside(snapshot, "vocab.json") is None


# 3. index shard names outside the checkpoint ----------------------------------------------------------
@pytest.mark.parametrize("shard", ["../checkpoint-3/model.safetensors", "{run}/checkpoint-3/model.safetensors",
                                   "linked.safetensors"])
def test_index_shards_outside_the_checkpoint_are_refused(extrapolate, pico, shard):
    _, run, _ = pico
    folder = run / "checkpoint-5"
    (folder / "linked.safetensors").symlink_to(run / "checkpoint-3" / "model.safetensors")
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: shard.format(run=run) for n in names}}))
    err = extrapolate(expect=2)
    assert "checkpoint-5/" in err and "outside" in err


# 4. ReDoS in rank_pattern / alpha_pattern -------------------------------------------------------------
def hand_adapter(folder: Path, **config) -> Path:
    """A rank-4 LoRA adapter of layer 0's q_proj (16 x 16), written by hand as PEFT saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{Q_PROJ}.lora_A.weight": torch.randn(4, 16, generator=gen),
               f"base_model.model.{Q_PROJ}.lora_B.weight": torch.randn(16, 4, generator=gen)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}))
    return folder


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["(.*.*)*X", "(a|a)*X", "(a+)+X", ".*.*.*.*.*X",
                                 "(a|a)(a|a)(a|a)(a|a)(a|a)X"])
def test_catastrophic_pattern_keys_are_refused_fast(pico, tmp_path, field, key):
    base, _, _ = pico
    folder = hand_adapter(tmp_path / "adapter", **{field: {key: 2}})
    start = time.monotonic()
    with pytest.raises(RelexError, match=rf"adapter_config.json: {field} key '.*' .*regular expression"):
        AdapterReader(folder, CheckpointReader(base))
    assert time.monotonic() - start < 1


def test_plain_and_simple_regex_pattern_keys_match_as_peft_does():
    from peft.utils.other import get_pattern_key

    module = "model.layers.0.self_attn.q_proj"
    for key in ["q_proj", "self_attn.q_proj", r"layers\.[01]\.self_attn\.(q|k)_proj", "^model.*q_proj", "proj",
                "layers.0"]:
        peft_says = get_pattern_key([key], module)
        assert pattern_key([key], module) == (key if peft_says == key else None)


# 5. a failure while an output folder is set up leaves nothing ------------------------------------------
def test_disk_full_while_copying_the_tokenizer_leaves_no_temporary(extrapolate, monkeypatch):
    def full(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(shutil, "copyfile", full)
    assert "No space left on device" in extrapolate(expect=2)


@pytest.mark.parametrize("auto_map", ["modeling_x.Cls", ["modeling_x.Cls"], {"AutoModel": 3}])
def test_wrongly_shaped_auto_map_is_one_line_and_leaves_nothing(extrapolate, pico, auto_map):
    base, _, _ = pico
    edit_json(base / "config.json", auto_map=auto_map)
    assert "config.json: key 'auto_map" in extrapolate(expect=2)


# 6. wrongly shaped or unbounded JSON --------------------------------------------------------------------
def sharded(folder: Path, index_text: str) -> Path:
    """``folder``'s weights as one shard behind a hand-written index."""
    os.replace(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(index_text)
    return folder


@pytest.mark.parametrize("text, message", [
    ("[]", "top level is a list, expected an object"),
    ("null", "top level is null, expected an object"),
    ('"x"', "top level is a string"),
    ('{"weight_map": []}', "key 'weight_map' is a list, expected an object"),
    ('{"weight_map": {"a": 3}}', "key 'weight_map['a']' is an integer (3), expected a string"),
    ('{"weight_map": {}}', "no weight_map"),
    ('{"weight_map": {"a": "x.safetensors"}, "metadata": {"total_size": NaN}}', "key 'metadata['total_size']' is NaN"),
    ("[" * 100_000, "nested deeper than"),
    ('{"a": ' * 100 + "1" + "}" * 100, "nested deeper than"),
    ('{"weight_map": ', "not valid JSON"),
    (b"\xff\xfe\xfa", "not valid JSON"),
])
def test_wrongly_shaped_index(pico, text, message):
    _, run, _ = pico
    folder = run / "checkpoint-5"
    sharded(folder, "")
    (folder / "model.safetensors.index.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RelexError, match="model.safetensors.index.json: ") as caught:
        CheckpointReader(folder)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_huge_json_is_refused_unread(pico):
    _, run, _ = pico
    folder = sharded(run / "checkpoint-5", "")
    with open(folder / "model.safetensors.index.json", "wb") as sparse:
        sparse.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(RelexError, match=r"index.json: .* bytes, more than"):
        CheckpointReader(folder)


@pytest.mark.parametrize("change, message", [
    ({"tie_word_embeddings": "yes"}, "key 'tie_word_embeddings' is a string ('yes'), expected true or false"),
    ({"rope_scaling": {"factor": float("nan")}}, "key 'rope_scaling['factor']' is NaN"),
    ({"max_position_embeddings": float("inf")}, "key 'max_position_embeddings' is Infinity"),
    ({"vocab_size": "18"}, "key 'vocab_size' is a string"),
    ({"auto_map": {"AutoTokenizer": ["tok.Tok", 5]}}, "key 'auto_map['AutoTokenizer'][1]' is an integer"),
])
def test_wrongly_shaped_base_config(pico, change, message):
    base, run, _ = pico
    edit_json(base / "config.json", **change)
    with pytest.raises(RelexError, match="config.json: ") as caught:
        Trajectory.discover(base, run).base_config()
    assert message in str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"r": "4"}, "key 'r' is a string ('4'), expected an integer"),
    ({"r": True}, "key 'r' is true, expected an integer"),
    ({"lora_alpha": "8"}, "key 'lora_alpha' is a string ('8'), expected a number"),
    ({"lora_alpha": float("nan")}, "key 'lora_alpha' is NaN"),
    ({"lora_alpha": 1e400}, "key 'lora_alpha' is Infinity"),
    ({"rank_pattern": ["q_proj"]}, "key 'rank_pattern' is a list, expected an object"),
    ({"rank_pattern": {"q_proj": 2.5}}, "key 'rank_pattern['q_proj']' is a number (2.5), expected an integer"),
    ({"alpha_pattern": {"q_proj": None}}, "key 'alpha_pattern['q_proj']' is null, expected a number"),
    ({"use_rslora": "false"}, "key 'use_rslora' is a string"),
    ({"peft_type": 3}, "key 'peft_type' is an integer"),
])
def test_wrongly_shaped_adapter_config(pico, tmp_path, change, message):
    base, _, _ = pico
    folder = hand_adapter(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(RelexError, match="adapter_config.json: ") as caught:
        AdapterReader(folder, CheckpointReader(base))
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["[]", "null"])
def test_adapter_config_that_is_not_an_object_through_the_cli(extrapolate, pico, text):
    _, run, _ = pico
    folder = run / "checkpoint-5"
    (folder / "model.safetensors").unlink()
    hand_adapter(folder)
    (folder / "adapter_config.json").write_text(text)
    assert "checkpoint-5/adapter_config.json: top level is" in extrapolate(expect=2)


# 7. messages that said the wrong thing -----------------------------------------------------------------
@pytest.mark.parametrize("kind, says", [("fifo", "a FIFO"), ("folder", "a folder"),
                                        ("dev-zero", "a character device"), ("dangling", "a broken link")])
def test_weights_that_are_not_a_regular_file(pico, kind, says):
    _, run, _ = pico
    weights = run / "checkpoint-5" / "model.safetensors"
    weights.unlink()
    {"fifo": lambda: os.mkfifo(weights), "folder": weights.mkdir,
     "dev-zero": lambda: weights.symlink_to("/dev/zero"),
     "dangling": lambda: weights.symlink_to("nowhere")}[kind]()
    with pytest.raises(RelexError, match=f"checkpoint-5/model.safetensors: not a regular file \\({says}\\)"):
        CheckpointReader(run / "checkpoint-5")


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_files_that_are_not_regular_files(pico, tmp_path, name):
    base, _, _ = pico
    folder = hand_adapter(tmp_path / "adapter")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(RelexError, match=f"{name}: not a regular file \\(a FIFO\\)"):
        Trajectory(base, []).reader(folder)


def pickled(run: Path, step: int, state, **options) -> Path:
    folder = run / f"checkpoint-{step}"
    torch.save(state, folder / "pytorch_model.bin", **options)
    (folder / "model.safetensors").unlink()
    return folder


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_pickle_blocked_by_weights_only_says_so(extrapolate, pico):
    _, run, ckpts = pico
    pickled(run, 5, {**ckpts[5], "payload": _RunsCode()})
    err = extrapolate("--allow-pickle", expect=2)
    assert "checkpoint-5/pytorch_model.bin: blocked" in err and "system" in err and "corrupt" not in err


def test_legacy_pickle_format_says_how_to_convert(extrapolate, pico):
    _, run, ckpts = pico
    pickled(run, 5, ckpts[5], _use_new_zipfile_serialization=False)
    err = extrapolate("--allow-pickle", expect=2)
    assert "checkpoint-5/pytorch_model.bin: legacy torch.save format" in err and "safe_serialization" in err


def test_adapter_weights_without_their_config(extrapolate, pico):
    _, run, _ = pico
    folder = run / "checkpoint-5"
    (folder / "model.safetensors").unlink()
    hand_adapter(folder)
    (folder / "adapter_config.json").unlink()
    assert "checkpoint-5: adapter_model.safetensors but no adapter_config.json" in extrapolate(expect=2)


def test_base_config_with_nan_is_refused_before_any_output(extrapolate, pico):
    base, _, _ = pico
    (base / "config.json").write_text((base / "config.json").read_text().replace(
        '"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    assert "config.json: key 'rms_norm_eps' is NaN" in extrapolate(expect=2)


def test_verl_step_past_the_cutoff_with_fsdp_shards_only_is_skipped(tmp_path, capsys, caplog):
    base = save_pico_model(tmp_path / "base")
    run = tmp_path / "run"
    drift_run(base, run, steps=[2, 3, 5], layout="verl")
    (run / "global_step_9" / "actor").mkdir(parents=True)
    (run / "global_step_9" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"fsdp")
    args = ["extrapolate", "--no-cache", "--base", str(base), "--run", str(run), "--target", "12"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--cutoff", "5", "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert "global_step_9" in caplog.text and "skipped" in caplog.text
    assert (tmp_path / "out" / "step-12" / "model.safetensors").is_file()
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2  # without a cutoff the step is needed
    assert "global_step_9" in capsys.readouterr().err
