"""Per-tensor trajectory statistics (Gram matrices) and their cache."""

from relex.stats.cache import StatsCache, default_cache_dir
from relex.stats.gram import TensorStats, gram_of

__all__ = ["StatsCache", "TensorStats", "default_cache_dir", "gram_of"]
