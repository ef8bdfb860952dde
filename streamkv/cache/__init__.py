"""Cache managers: one class each; `build_cache(name, ...)` picks one by `cache.name`."""

from streamkv.cache.base import CacheManager
from streamkv.cache.concat import ConcatCache

CACHES = {cls.name: cls for cls in (ConcatCache,)}


def build_cache(name: str, **kwargs) -> CacheManager:
    return CACHES[name](**kwargs)


__all__ = ["CacheManager", "CACHES", "build_cache"]
