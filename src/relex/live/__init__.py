"""relex beside a live training run: follow a run folder as a trainer writes it (``relex watch``, the TRL callback)."""

from relex.live.watcher import Watcher

__all__ = ["Watcher"]
