"""SIGTERM and SIGKILL at random points of a real run: nothing half-written is ever published, and a
rerun gives byte-identical outputs and leaves no temporaries (those of killed processes are swept)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

STEPS = (10, 20, 30)
TARGETS = (60, 90)


def make_run(root: Path) -> tuple[Path, Path]:
    """A base and three checkpoints of 8 MB each (four 512 x 1024 float32 tensors): 32 MB in all."""
    gen = torch.Generator().manual_seed(0)
    w0 = {f"model.layers.{i}.weight": torch.randn(512, 1024, generator=gen) for i in range(4)}
    drift = {n: torch.randn(t.shape, generator=gen) for n, t in w0.items()}
    base = root / "base"
    base.mkdir()
    save_file(w0, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    for step in STEPS:
        folder = root / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({n: t + 1e-3 * step * drift[n] for n, t in w0.items()}, str(folder / "model.safetensors"))
    return base, root / "run"


def command(base: Path, run: Path, out: Path, *extra) -> list[str]:
    targets = [a for t in TARGETS for a in ("--target", str(t))]
    return [sys.executable, "-m", "relex", "extrapolate", "-q", "--base", str(base), "--run", str(run), *targets,
            "--max-shard-size", "3MB", "--out", str(out), *map(str, extra)]


def contents(out: Path) -> dict[str, bytes]:
    """Every published file under ``out``, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def leftovers(*roots: Path) -> list[Path]:
    """Every relex temporary under ``roots``. os.walk skips a folder that a live run renames or sweeps while
    it is being listed (pathlib's rglob raises FileNotFoundError there)."""
    return [Path(folder, name) for root in roots for folder, dirs, files in os.walk(root)
            for name in (*dirs, *files) if name.startswith(".") and ".relex-" in name]


def mine(proc: subprocess.Popen, *roots: Path) -> list[Path]:
    """The temporaries of this process."""
    return [p for p in leftovers(*roots) if p.name.endswith(f"-{proc.pid}")]


def started(proc: subprocess.Popen, out: Path) -> float:
    """Wait until the run has begun writing (its hidden temporary exists); returns when, or when it ended."""
    while proc.poll() is None and not mine(proc, out):
        time.sleep(0.002)
    return time.monotonic()


def test_kill_at_random_points_then_rerun(tmp_path):
    base, run = make_run(tmp_path)
    reference, out, cache = tmp_path / "reference", tmp_path / "out", tmp_path / "cache"
    proc = subprocess.Popen(command(base, run, reference, "--no-cache"))
    begun = started(proc, reference)
    while proc.poll() is None and not all((reference / f"step-{t}").exists() for t in TARGETS):
        time.sleep(0.002)
    writing = time.monotonic() - begun  # statistics, weighted sums, writes and the renames
    assert proc.wait(timeout=120) == 0
    expected = contents(reference)
    assert sorted({Path(p).parts[0] for p in expected}) == ["step-60", "step-90"]

    rng = random.Random(10)
    for sig in (signal.SIGTERM, signal.SIGKILL) * 2:
        proc = subprocess.Popen(command(base, run, out, "--overwrite", "--cache", cache), stderr=subprocess.PIPE,
                                text=True)
        started(proc, out)
        time.sleep(rng.uniform(0.0, 1.1) * writing)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGTERM:  # handled like Ctrl-C: it cleans up after itself (-15: during exit, all done)
            assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), err
            assert not mine(proc, out, cache)
            if proc.returncode == -signal.SIGTERM:
                assert contents(out) == expected
        for folder in (out.iterdir() if out.exists() else []):  # published means complete and correct
            if not folder.name.startswith("."):
                assert contents(folder) == {str(Path(k).relative_to(folder.name)): v for k, v in expected.items()
                                            if Path(k).parts[0] == folder.name}

    subprocess.run(command(base, run, out, "--overwrite", "--cache", cache), check=True, timeout=120)
    assert contents(out) == expected
    assert not leftovers(out, cache)
