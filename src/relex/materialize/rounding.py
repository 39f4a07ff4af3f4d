"""float64 -> bfloat16 / float16 with one rounding (torch's own cast goes through float32 and rounds twice).

torch converts float64 to bf16/fp16 via float32, so a value just above a half-ulp tie of the target
lands on the tie in float32 and is then rounded to even: about 2^-16 of random values end one ulp off.
Rounding to float32 *to odd* first (truncate, then set the last bit when inexact) keeps the tie
information, and the second, round-to-nearest-even step is then exact: float32 has 24 bits, at least
2p + 2 for p = 8 (bf16) and p = 11 (fp16), which is what round-to-odd needs.
"""

from __future__ import annotations

import torch

_TWICE_ROUNDED = (torch.bfloat16, torch.float16)
CHUNK = 1 << 20  # elements converted at a time: the temporaries stay a few MB whatever the tensor


def round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (float64) correctly rounded (to nearest, ties to even) to ``dtype``."""
    if values.dtype != torch.float64 or dtype not in _TWICE_ROUNDED:
        return values.to(dtype)
    single = values.to(torch.float32)
    if dtype != torch.bfloat16:
        return _odd(values, single).to(dtype)
    # Only a float32 value that is a bf16 tie (low 16 bits 0x8000) can be rounded twice wrongly: monotone
    # rounding to float32, which holds every bf16 tie, keeps every other value on the right side of its tie.
    out = single.to(dtype)
    off_tie = (single.view(torch.int32) & 0xFFFF).bitwise_xor_(0x8000)  # 0 at a tie; min() is cheaper than ==
    if off_tie.numel() and int(off_tie.min()) == 0:
        ties = torch.nonzero(off_tie == 0).flatten()
        out[ties] = _odd(values[ties], single[ties]).to(dtype)
    return out


def _odd(values: torch.Tensor, single: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to float32 *to odd*, from ``single``, their float32 rounding to nearest."""
    back = single.double()
    inexact = back != values
    # a new tensor (``single`` is left as it is): truncate toward zero, then make it odd when inexact
    bits = single.view(torch.int32) - (inexact & (back.abs() > values.abs())).to(torch.int32)
    bits |= inexact.to(torch.int32)
    return bits.view(torch.float32)


def cast_into(out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Fill flat ``out`` with flat ``values`` rounded once to ``out.dtype``, chunk by chunk."""
    for start in range(0, values.numel(), CHUNK):
        stop = min(start + CHUNK, values.numel())
        out[start:stop] = round_once(values[start:stop], out.dtype)
    return out
