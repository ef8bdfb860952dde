from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamkv.policies.scored import ScoredConfig, ScoredPolicy, attention_weights


@dataclass
class TOVAConfig(ScoredConfig):
    name: str = "tova"


def tova_scores(attn: torch.Tensor) -> torch.Tensor:
    """TOVA's score of one layer: attn [Hkv, G, T, L] (the last query row first along T) -> [L], the
    attention of the step's query, mean over all heads. Summed over the layers by the caller (the host
    policy, and the graph's ScoredEviction)."""
    return attn[:, :, 0].mean((0, 1))


class TOVAPolicy(ScoredPolicy):
    """TOVA (Oren et al. 2024): evict the tokens the current query attends to least.

    Score of a cached token = attention weight of the step's (last) query, averaged over all heads
    and layers. With compress_every = R > 1 the prune removes the R lowest-scored tokens at once
    (R = 1 is TOVA's per-step eviction). Keeps the n_sink sinks and, as kvpress does, the newest
    token. Positions: original text positions (as kvpress) or, with policy.positions=shift,
    StreamingLLM's.
    """

    name = "tova"
    config: type = TOVAConfig
    device_scores = "last"

    @property
    def n_recent(self) -> int:
        return 1

    def reset(self) -> None:
        self._acc = None

    def observe(self, layer, q, k, mask) -> None:
        if not self.due(k.shape[2]):  # the scores are only needed right before a prune
            return
        w = attention_weights(q[:, :, -1:], k, None if mask is None else mask[-1:], self.scale)
        s = tova_scores(w)
        self._acc = s if layer == 0 or self._acc is None else self._acc + s

    def scores(self, length: int) -> np.ndarray:
        return self._acc.cpu().numpy()
