"""An independent public implementation of RELEX, its algorithm re-implemented here to time it against relex.

NOT relex, and not that implementation's code (it has no licence): github.com/basetenlabs/relex-replication,
``relex_replication/extrapolate.py`` (read at commit 1af1475, with ``tests/test_extrapolate.py`` and the README),
functions ``TensorStore`` (``read_block``), ``blocks``, ``fp16_delta``, ``history_block``, ``rank1_from_gram``,
``canonicalize_sign``, ``stream_rank1``, ``predict_coefficient``, ``materialize``, ``copy_ancillary`` and ``build``.
Its algorithm, which this file follows step for step so that ``bench_extrapolate.py --independent`` times the
same work on the same machine:

1. Index each model folder once (shard of each tensor, shape, dtype); every later read of a block re-opens the
   shard with ``safe_open`` and slices rows ``[lo:hi]`` of one tensor (a 0-d tensor is read whole).
2. Per tensor, blocks of whole rows along axis 0, ``max(1, 1_000_000 // row_elements)`` rows each: the block
   size is part of the numerics, since every sum below is a float32 sum over blocks.
3. The history of a block, ``M`` (``[N, block]`` float32): the base block is read on the calling thread, then a
   fresh pool of ``min(16, N)`` threads reads the N checkpoints' blocks, each delta formed as
   ``fp16(W_t) - fp16(W_0)`` in float16 (torch), flattened and widened to float32 (numpy).
4. Pass 1: ``G += M M^T`` in float32 over the blocks. ``eigh(G)`` in float32; u, the top eigenvector, and
   s = sqrt(top eigenvalue), in float32. If s == 0 the factor stays zero.
5. Pass 2 (the history read again): ``v_block = M^T u / s`` (float32) is stored into a float32 vector the size
   of the whole tensor, and ``c += M v_block`` (float32, N coefficients). Sign fixed so that v's largest
   magnitude entry is positive (v and c flipped together); non-finite v or c is an error.
6. The line: float64 least squares of c on the checkpoint rows 0..N-1, evaluated at row ``target - 1``. The
   replication saves every step (``global_step_1..N``), so row i is step i + 1; here x = step - 1 on the real
   step numbers, the same line for a run saved at steps 1..N and the right one for any other spacing.
7. Pass 3, per tensor right after its factor: each base block read again, ``delta = v_block * c_target``
   (float32), ``W = bf16(fp32(W_0) + delta)``; the output tensor is held whole, and each base shard's tensors
   are saved together under the shard's name (``save_file``), with the base folder's other files copied.

So each checkpoint is read twice and the base three times, a float32 vector of the largest tensor and the
whole output shard are held, and the arithmetic is float16 deltas with float32 sums. Differences from it,
both for the benchmark's inputs: relex's layout (``BASE`` and ``RUN/checkpoint-N`` or ``RUN/global_step_N``,
``--cutoff``) instead of ``run/base_model`` and ``run/trajectory``; and a float32 run is written in float32
(the replication accepts bf16 only and always writes bf16).

    python benchmarks/independent_relex.py --base BASE --run RUN --cutoff 16 --target 64 --out OUT
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

BLOCK_ELEMENTS = 1_000_000  # fixed: the float32 sums are taken block by block
READERS = 16


class Folder:
    """Which shard holds each tensor of a safetensors model folder, and its shape and dtype."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / "model.safetensors.index.json"
        shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                  else sorted(p.name for p in path.glob("*.safetensors")))
        self.shard: dict[str, str] = {}
        self.spec: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in shards:
            with safe_open(str(path / shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    view = f.get_slice(name)
                    self.shard[name], self.spec[name] = shard, (tuple(view.get_shape()), view.get_dtype())
        if not self.shard:
            raise SystemExit(f"no safetensors weights in {path}")

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of one tensor (a 0-d one whole), the shard opened afresh as the replication does."""
        with safe_open(str(self.path / self.shard[name]), framework="pt") as f:
            return f.get_slice(name)[lo:hi] if self.spec[name][0] else f.get_tensor(name)


def row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first flat element, end flat element) of each block of about 1M elements."""
    if not shape:
        return [(0, 1, 0, 1)]
    width = math.prod(shape[1:])
    rows = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [(lo, min(lo + rows, shape[0]), lo * width, min(lo + rows, shape[0]) * width)
            for lo in range(0, shape[0], rows)]


def history(base: Folder, checkpoints: list[Folder], name: str, lo: int, hi: int) -> np.ndarray:
    """[N, block] float32 deltas fp16(W_t) - fp16(W_0) of one block, the checkpoints read by a fresh thread pool."""
    w0 = base.rows(name, lo, hi)

    def delta(checkpoint: Folder) -> np.ndarray:
        return (checkpoint.rows(name, lo, hi).half() - w0.half()).flatten().float().numpy()

    with ThreadPoolExecutor(max_workers=min(READERS, len(checkpoints))) as pool:
        return np.stack(list(pool.map(delta, checkpoints))).astype(np.float32, copy=False)


def rank1(base: Folder, checkpoints: list[Folder], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(v, c): the tensor's float32 rank-1 factor from two passes over its history (Gram, then projections)."""
    shape, n = base.spec[name][0], len(checkpoints)
    gram = np.zeros((n, n), dtype=np.float32)
    for lo, hi, _, _ in row_blocks(shape):
        m = history(base, checkpoints, name, lo, hi)
        gram += m @ m.T
    values, vectors = np.linalg.eigh(gram)  # ascending: the last is the top
    u, s = vectors[:, -1].astype(np.float32), np.float32(np.sqrt(max(values[-1], np.float32(0))))
    v, c = np.zeros(math.prod(shape), dtype=np.float32), np.zeros(n, dtype=np.float32)
    if s > 0:
        for lo, hi, a, b in row_blocks(shape):
            m = history(base, checkpoints, name, lo, hi)
            v[a:b] = (m.T @ u) / s
            c += m @ v[a:b]
        if v.size and v[np.abs(v).argmax()] < 0:
            v, c = -v, -c
    if not (np.isfinite(v).all() and np.isfinite(c).all()):
        raise SystemExit(f"non-finite rank-1 factor for {name}")
    return v, c


def line_at(c: np.ndarray, steps: list[int], target: int) -> float:
    """Float64 least-squares line of c on (step - 1), at target - 1 (rows 0..N-1 when steps are 1..N)."""
    x = np.asarray(steps, dtype=np.float64) - 1.0
    slope, intercept = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), c.astype(np.float64), rcond=None)[0]
    return float(slope) * (target - 1.0) + float(intercept)


def checkpoint_dirs(run: Path, cutoff: int | None) -> list[tuple[int, Path]]:
    found = sorted((int(m.group(2)), p) for p in run.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"(checkpoint-|global_step_)(\d+)", p.name)))
    return [(s, p) for s, p in found if cutoff is None or s <= cutoff]


def extrapolate(base_dir: Path, run: Path, cutoff: int | None, target: int, out: Path) -> None:
    base = Folder(base_dir)
    found = checkpoint_dirs(run, cutoff)
    if len(found) < 2:
        raise SystemExit("RELEX needs at least two checkpoints")
    steps, checkpoints = [s for s, _ in found], [Folder(p) for _, p in found]
    for ckpt in checkpoints:
        if ckpt.spec != base.spec:
            raise SystemExit(f"{ckpt.path}: tensors differ from the base's")
    dtypes = {d for _, d in base.spec.values()}
    if not dtypes <= {"BF16", "F32"}:
        raise SystemExit(f"bf16 (or, here, fp32) weights only, not {sorted(dtypes)}")
    out.mkdir(parents=True)
    for src in base_dir.rglob("*"):
        rel = src.relative_to(base_dir)
        if src.is_file() and src.suffix != ".safetensors" and ".cache" not in rel.parts:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / rel)
    for shard in sorted(set(base.shard.values())):
        written = {}
        for name in sorted(n for n in base.shard if base.shard[n] == shard):
            shape, dtype = base.spec[name]
            v, c = rank1(base, checkpoints, name)
            scale = line_at(c, steps, target)
            result = torch.empty(shape, dtype=torch.bfloat16 if dtype == "BF16" else torch.float32)
            for lo, hi, a, b in row_blocks(shape):
                w0 = base.rows(name, lo, hi).reshape(-1)
                w = (w0.float() + torch.from_numpy(v[a:b]) * scale).to(result.dtype)
                if not torch.isfinite(w).all():
                    raise SystemExit(f"non-finite weights for {name}")
                result.view(-1)[a:b] = w
            written[name] = result
        save_file(written, str(out / shard), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model folder (W_0)")
    parser.add_argument("--run", type=Path, required=True, help="folder of checkpoint-N (or global_step_N) folders")
    parser.add_argument("--cutoff", type=int, help="the last observed step (default: every checkpoint)")
    parser.add_argument("--target", type=int, required=True, help="the step to extrapolate to")
    parser.add_argument("--out", type=Path, required=True, help="the new model folder (must not exist)")
    args = parser.parse_args()
    extrapolate(args.base, args.run, args.cutoff, args.target, args.out)


if __name__ == "__main__":
    main()
