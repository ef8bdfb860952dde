"""Cache managers: one class each; `build_cache(name, ...)` picks one by `cache.name`.

concat (the seed's baseline), soft_ring, ring, static: see docs/cache.md. A manager is sized by numbers
(streamkv.sizing.cache_sizes derives them from the policy); nothing here knows the policies.
"""

from streamkv.cache.base import CacheManager
from streamkv.cache.concat import ConcatCache
from streamkv.cache.ring import RingCache
from streamkv.cache.slots import SlotCache
from streamkv.cache.soft_ring import SoftRingCache
from streamkv.cache.static import StaticCache
from streamkv.errors import ConfigError

CACHES = {cls.name: cls for cls in (ConcatCache, SoftRingCache, RingCache, StaticCache)}


def check_cache(cfg, bound: int | None = None) -> None:
    """ConfigError (one line) if cfg.cache cannot serve this run; `bound`: the tokens the policy holds
    during a step (streamkv.sizing.policy_bound; None: it never evicts), checked against cache.capacity."""
    if cfg.cache.name not in CACHES:
        raise ConfigError(f"cache: '{cfg.cache.name}' is not one of {', '.join(sorted(CACHES))}")
    CACHES[cfg.cache.name].check(cfg, bound)


def build_cache(name: str, **kwargs) -> CacheManager:
    return CACHES[name](**kwargs)


__all__ = ["CacheManager", "SlotCache", "CACHES", "build_cache", "check_cache"]
