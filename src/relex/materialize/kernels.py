"""Fused CPU kernels for the engine's two passes over stored rows (numba; compiled on first use, cached on disk).

Each reads a column tile of the rows as stored (bf16 or fp16 bits), converts it to float64 and
subtracts the base (both exact) in a cache-resident buffer, then forms the Gram products or the weighted
sums rounded once, where torch takes three passes over memory (convert, subtract, product). The Gram's
float64 reductions are reassociated for SIMD, the same way on every call (a fixed tile order), so a span's
result does not depend on which thread runs it; the weighted sums add in checkpoint order, as torch.mm does,
and round once exactly as ``rounding.round_once`` does (to float32 by odd, then to nearest even)."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

# Rows the kernels read; others take torch's path. fp32 rows do too: on rows in memory (not cache) the fused
# passes ran at 1.05 ns an element here against torch's 1.17 (Gram) and 0.56 (sums), engine_floor.py, T = 8.
STORED_DTYPES = (torch.bfloat16, torch.float16)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TILE = 4             # Gram entries per register tile side: 4 x 4 accumulators, 8 row loads per column
LANES = 8            # columns of a tile padded to a multiple of this (zeros add nothing to a product)
GRAM_TILE_BYTES = 64 << 10  # float64 deltas of one column tile: an L1/L2-resident buffer (measured best at T = 8-75)
SUMS_TILE = 1024     # columns of one weighted-sums tile (its float64 base and sums: 16 KB)


def raw(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as the numpy array the kernels take: bf16 as uint16 bits, fp16 as int16 bits (the
    kernels tell the two apart by type), fp32 and fp64 as themselves."""
    values = values.detach()
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    if values.dtype == torch.float16:
        return values.view(torch.int16).numpy()
    return values.numpy()


@njit(nogil=True, cache=True)
def _gram_tile_shape(n_steps: int) -> tuple[int, int]:
    """(rows, columns) of one Gram column tile: T rounded up to TILE, by GRAM_TILE_BYTES of float64 in all."""
    rows = max(TILE, -(-n_steps // TILE) * TILE)
    return rows, max(LANES, GRAM_TILE_BYTES // (8 * rows) // LANES * LANES)


def _to_float64(stored):
    """One stored value as float64, exactly: chosen by the array's type when compiled (no branch per value)."""


def _bf16_to_float64(stored):
    """bf16 bits: the high half of a float32."""
    return np.float64(np.uint32(np.uint32(stored) << np.uint32(16)).view(np.float32))


def _fp16_to_float64(stored):
    """fp16 bits: subnormals scaled, Inf and NaN kept, normals rebiased."""
    h = np.uint64(np.uint16(stored))
    exponent, mantissa = (h >> np.uint64(10)) & np.uint64(31), h & np.uint64(1023)
    if exponent == 0:
        value = np.float64(mantissa) * 2.0 ** -24
    elif exponent == 31:
        value = np.inf if mantissa == 0 else np.nan
    else:
        bits = ((exponent + np.uint64(1008)) << np.uint64(52)) | (mantissa << np.uint64(42))  # rebiased 15 -> 1023
        value = np.uint64(bits).view(np.float64)
    return -value if h >> np.uint64(15) else value


@overload(_to_float64)
def _to_float64_of(stored):
    """bf16 bits come as uint16, fp16 bits as int16 (``raw``), fp32 as float32."""
    if stored == types.uint16:
        return _bf16_to_float64
    if stored == types.int16:
        return _fp16_to_float64
    return lambda stored: np.float64(stored)


@njit(nogil=True, cache=True, inline="always")
def _odd_float32_bits(value):
    """``value`` (float64) rounded to float32 *to odd*, as its bits: exact for the second rounding to 16 bits."""
    single = np.float32(value)
    bits = np.uint32(single.view(np.uint32))
    back = np.float64(single)
    if back != value:  # inexact (or NaN): truncate toward zero, then set the last bit
        if abs(back) > abs(value):
            bits -= np.uint32(1)
        bits |= np.uint32(1)
    return bits


@njit(nogil=True, cache=True, inline="always")
def _bf16_bits(value):
    """``value`` (float64) correctly rounded to bfloat16 (NaN as torch's scalar cast writes it)."""
    bits = _odd_float32_bits(value)
    if bits & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(nogil=True, cache=True, inline="always")
def _fp16_bits(value):
    """``value`` (float64) correctly rounded to float16: float32 by odd, then to nearest even by integer steps."""
    bits = _odd_float32_bits(value)
    sign = np.uint32((bits >> np.uint32(16)) & np.uint32(0x8000))
    x = bits & np.uint32(0x7FFFFFFF)
    if x > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00))
    if x >= np.uint32(0x47800000):  # 65536 and above (and Inf): Inf; 65520 up to it round up to Inf below
        return np.uint16(sign | np.uint32(0x7C00))
    if x >= np.uint32(0x38800000):  # a normal float16: rebias, keep 10 bits, round the 13 dropped to even
        half = (x - np.uint32(0x38000000)) >> np.uint32(13)
        rest = x & np.uint32(0x1FFF)
        if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and half & np.uint32(1)):
            half += np.uint32(1)
        return np.uint16(sign | half)
    exponent = x >> np.uint32(23)  # a subnormal float16 (or 0): |value| / 2^-24 rounded to an integer, to even
    shift = np.uint32(126) - exponent
    if exponent == 0 or shift > np.uint32(24):
        return np.uint16(sign)
    mantissa = (x & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    half = mantissa >> shift
    rest = mantissa & ((np.uint32(1) << shift) - np.uint32(1))
    tie = np.uint32(1) << (shift - np.uint32(1))
    if rest > tie or (rest == tie and half & np.uint32(1)):
        half += np.uint32(1)
    return np.uint16(sign | half)


def _rounded(value, out):
    """``value`` (float64) correctly rounded to ``out``'s dtype, as the element to store there."""


@overload(_rounded)
def _rounded_of(value, out):
    """bf16 and fp16 by their bits (``raw``); float32 rounded to nearest by the store, float64 as it is."""
    if out.dtype == types.uint16:
        return lambda value, out: _bf16_bits(value)
    if out.dtype == types.int16:
        return lambda value, out: np.int16(_fp16_bits(value))
    return lambda value, out: value


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _gram_tiles(deltas, rows, width, gram):
    """Add the products of ``deltas``' first ``rows`` rows (a multiple of TILE) over ``width`` columns to the upper
    triangle's TILE x TILE blocks of ``gram``; the reductions are vectorised across columns (reassociated)."""
    for i0 in range(0, rows, TILE):
        a0, a1, a2, a3 = deltas[i0], deltas[i0 + 1], deltas[i0 + 2], deltas[i0 + 3]
        for j0 in range(i0, rows, TILE):
            b0, b1, b2, b3 = deltas[j0], deltas[j0 + 1], deltas[j0 + 2], deltas[j0 + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0.0
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = 0.0
            for c in range(width):
                x0, x1, x2, x3 = a0[c], a1[c], a2[c], a3[c]
                y0, y1, y2, y3 = b0[c], b1[c], b2[c], b3[c]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            gram[i0, j0] += s00
            gram[i0, j0 + 1] += s01
            gram[i0, j0 + 2] += s02
            gram[i0, j0 + 3] += s03
            gram[i0 + 1, j0] += s10
            gram[i0 + 1, j0 + 1] += s11
            gram[i0 + 1, j0 + 2] += s12
            gram[i0 + 1, j0 + 3] += s13
            gram[i0 + 2, j0] += s20
            gram[i0 + 2, j0 + 1] += s21
            gram[i0 + 2, j0 + 2] += s22
            gram[i0 + 2, j0 + 3] += s23
            gram[i0 + 3, j0] += s30
            gram[i0 + 3, j0 + 1] += s31
            gram[i0 + 3, j0 + 2] += s32
            gram[i0 + 3, j0 + 3] += s33


@njit(nogil=True, cache=True)
def gram_span(rows, c0, c1):
    """Gram matrix (T x T float64) of the exact deltas ``rows[1:] - rows[0]`` over columns c0:c1, made a column
    tile at a time in a buffer of GRAM_TILE_BYTES."""
    n_steps = rows.shape[0] - 1
    padded, columns = _gram_tile_shape(n_steps)
    deltas = np.zeros((padded, columns))
    base = np.empty(columns)
    gram = np.zeros((padded, padded))
    for w0 in range(c0, c1, columns):
        width = min(columns, c1 - w0)
        padded_width = -(-width // LANES) * LANES
        for c in range(width):
            base[c] = _to_float64(rows[0, w0 + c])
        for t in range(n_steps):
            stored, delta = rows[t + 1], deltas[t]
            for c in range(width):
                delta[c] = _to_float64(stored[w0 + c]) - base[c]
            delta[width:padded_width] = 0.0
        _gram_tiles(deltas, padded, padded_width, gram)
    full = np.empty((n_steps, n_steps))
    for i in range(n_steps):
        for j in range(i, n_steps):
            full[i, j] = full[j, i] = gram[i, j]
    return full


@njit(nogil=True, cache=True)
def sums_span(rows, weights, out, c0, c1):
    """``out[c0:c1]`` = base + sum_t weights[t] (rows[t + 1] - base) over columns c0:c1, added in checkpoint order
    from 0.0 (as torch.mm does), then the base, in float64, and rounded once to ``out``'s dtype."""
    n_steps = rows.shape[0] - 1
    base = np.empty(SUMS_TILE)
    sums = np.empty(SUMS_TILE)
    for w0 in range(c0, c1, SUMS_TILE):
        width = min(SUMS_TILE, c1 - w0)
        for c in range(width):
            base[c] = _to_float64(rows[0, w0 + c])
            sums[c] = 0.0
        for t in range(n_steps):
            weight, stored = weights[t], rows[t + 1]
            for c in range(width):
                sums[c] += weight * (_to_float64(stored[w0 + c]) - base[c])
        for c in range(width):
            out[w0 + c] = _rounded(sums[c] + base[c], out)
