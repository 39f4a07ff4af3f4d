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
    back = single.double()
    inexact = back != values
    bits = single.view(torch.int32)
    bits -= (inexact & (back.abs() > values.abs())).to(torch.int32)  # truncate toward zero
    bits |= inexact.to(torch.int32)                                    # ... and make it odd when inexact
    return bits.view(torch.float32).to(dtype)


def cast_into(out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Fill flat ``out`` with flat ``values`` rounded once to ``out.dtype``, chunk by chunk."""
    for start in range(0, values.numel(), CHUNK):
        stop = min(start + CHUNK, values.numel())
        out[start:stop] = round_once(values[start:stop], out.dtype)
    return out
