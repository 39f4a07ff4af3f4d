"""Human sizes ("256MB", "2GB", "5GiB") to bytes, with the same decimal/binary rules as Hugging Face."""

import re

from relex.errors import RelexError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_SIZE = 10**18  # 1 EB: far above any memory or shard, far below where a float loses the bytes


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``2GB`` (10**9) or ``512MiB`` (2**20); plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise RelexError(f"cannot read size {text!r}: use e.g. 256MB, 2GB or 5GiB")
    size = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not size <= MAX_SIZE:
        raise RelexError(f"size {text[:40]!r}{'...' if len(text) > 40 else ''} is above 1EB, the largest relex takes")
    return int(size)


def format_size(n: float) -> str:
    """Bytes as a short human string (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"
