from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamkv.errors import ConfigError
from streamkv.policies.scored import ScoredConfig, ScoredPolicy, attention_weights

QUERY_CHUNK = 256


@dataclass
class H2OConfig(ScoredConfig):
    name: str = "h2o"
    recent_frac: float = 0.5  # share of the window kept as the recent window (the rest: heavy hitters)


def h2o_scores(attn: torch.Tensor, n_layers: int) -> torch.Tensor:
    """H2O's score increment of one layer: attn [Hkv, G, T, L] -> [L], the attention every key receives from
    the T query rows (summed), mean over all heads, / n_layers. Accumulated over layers and steps by the
    caller (the host policy, and the graph's ScoredEviction)."""
    return attn.sum(2).mean((0, 1)) / n_layers


class H2OPolicy(ScoredPolicy):
    """H2O (Zhang et al. 2023): heavy hitters + a recent window.

    Each cached token accumulates the attention it receives from every query since it entered the
    cache (every query row of every step, mean over heads and layers). A prune keeps the n_sink
    sinks, the round(recent_frac * window) newest tokens, and the heavy hitters (highest accumulated
    attention) filling the rest of the budget n_sink + window. Positions: original text positions
    (as kvpress) or, with policy.positions=shift, StreamingLLM's.
    """

    name = "h2o"
    config: type = H2OConfig
    device_scores = "accumulated"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        f = cls.settings(cfg.policy).recent_frac
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"policy.recent_frac: must be between 0 and 1 (got {f})")

    @property
    def n_recent(self) -> int:
        return int(round(float(self.pcfg.recent_frac) * self.window))

    def reset(self) -> None:
        self._acc = None

    def observe(self, layer, q, k, mask) -> None:
        L = k.shape[2]
        if layer == 0:
            if self._acc is None:
                self._acc = torch.zeros(L, device=k.device)
            elif len(self._acc) < L:
                self._acc = torch.cat([self._acc, self._acc.new_zeros(L - len(self._acc))])
        for i in range(0, q.shape[2], QUERY_CHUNK):  # a long prefill: bounded [H, chunk, L] at a time
            m = None if mask is None else mask[i:i + QUERY_CHUNK]
            w = attention_weights(q[:, :, i:i + QUERY_CHUNK], k, m, self.scale)
            self._acc += h2o_scores(w, self.n_layers)

    def scores(self, length: int) -> np.ndarray:
        return self._acc.cpu().numpy()

    def on_evict(self, keep: np.ndarray) -> None:
        self._acc = self._acc[torch.as_tensor(keep, device=self._acc.device)]
