"""The public RELEX reference pipeline's algorithm, re-implemented from its description to time it here.

NOT relex, and not the reference's code: github.com/weizhepei/RELEX's ``scripts/precompute_deltas.py`` and
``scripts/svd_extrapolation.py`` as their docstrings describe them, with what a benchmark needs and nothing
more, so that ``bench_extrapolate.py --reference`` times the same algorithm on the same machine:

1. ``precompute``: load the base and then each checkpoint whole (safetensors ``load_file``), as float16;
   write every tensor's deltas theta_t - theta_0 as float16 to a ``[T, *shape]`` memory-mapped ``.npy``
   store, one file per tensor.
2. ``extrapolate``: per tensor, read its T delta rows as float32, G = M M^T (float32), ``eigh``,
   v1 = M^T u1 / s1, c_t = M v1, a least-squares line of c_t on the checkpoint index, and
   W_T = W_0 + c_T v1 at the target's index; the whole predicted state dict is saved with safetensors.

    python benchmarks/reference_pipeline.py precompute BASE RUN STORE
    python benchmarks/reference_pipeline.py extrapolate BASE STORE OUT --target-index 63
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def checkpoints(run: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def precompute(base: Path, run: Path, store: Path) -> None:
    store.mkdir(parents=True)
    base_state = {k: v.to(torch.float16) for k, v in load_file(str(base / "model.safetensors")).items()}
    paths = checkpoints(run)
    files = {name: np.lib.format.open_memmap(store / f"{name}.npy", mode="w+", dtype=np.float16,
                                             shape=(len(paths),) + tuple(t.shape))
             for name, t in base_state.items()}
    for t, path in enumerate(paths):
        state = load_file(str(path / "model.safetensors"))
        for name, value in state.items():
            files[name][t] = (value.to(torch.float16) - base_state[name]).numpy()
        del state
    for array in files.values():
        array.flush()
    (store / "metadata.json").write_text(json.dumps({"steps": len(paths)}))


def extrapolate(base: Path, store: Path, out: Path, target_index: float) -> None:
    base_state = load_file(str(base / "model.safetensors"))
    predicted = {}
    for name, w0 in base_state.items():
        m = np.load(store / f"{name}.npy", mmap_mode="r").reshape(-1, w0.numel()).astype(np.float32)
        values, vectors = np.linalg.eigh(m @ m.T)
        top = int(np.argmax(values))
        s1 = float(np.sqrt(max(values[top], 0.0)))
        if s1 == 0.0:
            predicted[name] = w0.clone()
            continue
        v1 = m.T @ vectors[:, top] / s1
        c = m @ v1
        slope, intercept = np.polyfit(np.arange(len(c), dtype=np.float64), c.astype(np.float64), 1)
        delta = torch.from_numpy((slope * target_index + intercept) * v1).view(w0.shape)
        predicted[name] = (w0.float() + delta).to(w0.dtype)
    out.mkdir(parents=True)
    save_file(predicted, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    pre = sub.add_parser("precompute")
    pre.add_argument("base", type=Path)
    pre.add_argument("run", type=Path)
    pre.add_argument("store", type=Path)
    ext = sub.add_parser("extrapolate")
    ext.add_argument("base", type=Path)
    ext.add_argument("store", type=Path)
    ext.add_argument("out", type=Path)
    ext.add_argument("--target-index", type=float, required=True)
    args = parser.parse_args()
    if args.stage == "precompute":
        precompute(args.base, args.run, args.store)
    else:
        extrapolate(args.base, args.store, args.out, args.target_index)


if __name__ == "__main__":
    main()
