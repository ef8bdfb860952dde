from __future__ import annotations

from dataclasses import dataclass

from streamkv.policies.lazy import LazyConfig, LazyStreamingPolicy


@dataclass
class RefreshConfig(LazyConfig):
    name: str = "refresh"
    refresh_budget: int = 16  # the preset's region (LazyConfig: 0 = off)


class RefreshPolicy(LazyStreamingPolicy):
    """Lazy streaming with a dynamic sink region fed from the evicted segments.

    Before a segment is evicted, up to M = `policy.refresh_per_prune` (default refresh_budget) of its
    tokens move into the refresh region, placed after the sinks (text order kept); the region holds
    at most `policy.refresh_budget` tokens, its oldest leaving first. `policy.refresh_select` picks
    them: uniform (evenly spread), structural (newline > sentence end > quote tokens, by their
    decoded strings), entropy (highest predictive entropy of the token's own step), attention (the
    highest SnapKV scores: attention of the last `obs_window` queries, pooled, summed over layers).
    `policy.refresh_keep=score` (attention only): the region keeps its best-scored tokens under each
    prune's scores instead of its newest. refresh_budget = 0 equals `streaming`.
    """

    name = "refresh"
    config: type = RefreshConfig
    piece = "refresh"
