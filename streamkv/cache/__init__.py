"""Cache managers: one class each; `build_cache(name, ...)` picks one by `cache.name`."""

from streamkv.cache.base import CacheManager
from streamkv.cache.concat import ConcatCache

CACHES = {cls.name: cls for cls in (ConcatCache,)}


def check_cache(cfg) -> None:
    from streamkv.errors import ConfigError

    if cfg.cache.name not in CACHES:
        raise ConfigError(f"cache: '{cfg.cache.name}' is not one of {', '.join(sorted(CACHES))}")
    CACHES[cfg.cache.name].check(cfg)


def build_cache(name: str, **kwargs) -> CacheManager:
    return CACHES[name](**kwargs)


__all__ = ["CacheManager", "CACHES", "build_cache", "check_cache"]
