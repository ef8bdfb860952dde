from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from streamkv.policies.lazy import LazyConfig, LazyStreamingPolicy


@dataclass
class MaxDropConfig(LazyConfig):
    name: str = "max_drop"
    max_drop: Optional[int] = 8  # the preset's cap (LazyConfig: null = off); required here


class MaxDropPolicy(LazyStreamingPolicy):
    """Lazy streaming whose prunes drop at most `policy.max_drop` tokens each.

    A prune is triggered as in `streaming`; if the overflow is larger than max_drop, max_drop tokens
    go now and the policy stays in "pruning mode", dropping up to max_drop more after each following
    step until the cache is back to n_sink + window. max_drop >= R equals `streaming`.
    """

    name = "max_drop"
    config: type = MaxDropConfig
    piece = "max_drop"
    requires = "max_drop"
