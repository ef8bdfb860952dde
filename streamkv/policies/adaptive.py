from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from streamkv.policies.lazy import LazyConfig, LazyStreamingPolicy


@dataclass
class AdaptiveConfig(LazyConfig):
    name: str = "adaptive"
    mode: Optional[str] = "slack"  # the preset's trigger (LazyConfig: null = the fixed period); required here
    extra_slack: int = 32


class AdaptivePolicy(LazyStreamingPolicy):
    """Lazy streaming whose trigger replaces the fixed period (compress_every must stay 1).

    mode=slack: prune as soon as the cache exceeds n_sink + window + extra_slack (equals `streaming`
      with compress_every = extra_slack + 1; the control for mode=entropy).
    mode=entropy: the allowed slack follows the mean predictive entropy of the last entropy_window
      steps: extra_slack at or below entropy_low, 0 (prune now) at or above entropy_high, linear
      in between. High entropy prunes early; low entropy lets the cache grow.
    """

    name = "adaptive"
    config: type = AdaptiveConfig
    piece = "adaptive"
    requires = "mode"
