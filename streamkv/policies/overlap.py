from __future__ import annotations

from dataclasses import dataclass

from streamkv.policies.lazy import LazyConfig, LazyStreamingPolicy


@dataclass
class OverlapConfig(LazyConfig):
    name: str = "overlap"
    overlap: int = 8  # the preset's overlap (LazyConfig: 0 = off); must be < compress_every


class OverlapPolicy(LazyStreamingPolicy):
    """Lazy streaming whose prunes keep `policy.overlap` extra recent tokens (overlap < R).

    Triggered as in `streaming` (cache > n_sink + window + R - 1), but the prune keeps
    n_sink + window + overlap tokens, so each prune drops R - overlap and prunes come every
    R - overlap steps. overlap = 0 equals `streaming`.
    """

    name = "overlap"
    config: type = OverlapConfig
    piece = "overlap"
