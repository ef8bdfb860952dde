from __future__ import annotations

from dataclasses import dataclass

from streamkv.config import PolicyConfig
from streamkv.policies.lazy import LazyStreamingPolicy


@dataclass
class StreamingConfig(PolicyConfig):
    name: str = "streaming"


class StreamingPolicy(LazyStreamingPolicy):
    """StreamingLLM: n_sink sinks + the `window` most recent tokens, pruned lazily.

    Prunes when the cache exceeds n_sink + window + compress_every - 1 tokens, i.e. every R steps
    in steady state; R = 1 is strict StreamingLLM (evict after every step). The lazy core with every
    piece off; it takes no knobs (the reference every controlled policy is compared with).
    """

    name = "streaming"
    config: type = StreamingConfig
