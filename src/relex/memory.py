"""Give freed heap memory back to the operating system, so that own memory stays near what is in use."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """``malloc_trim`` of the C library this process runs on (glibc), or None where it has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Reading a tensor in blocks frees many temporaries of a few MB between small objects that live on (a
    method's factors): glibc keeps that fragmented heap, and NExt's factor pass on a LoRA run of SmolLM2-135M
    held 5.3 GB at a 256 MB budget, 0.5 GB when trimmed after each tensor. Not free: trimming after every
    tensor of RELEX's writing pass cost 37% of its time there, so only NExt's fit calls it.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
