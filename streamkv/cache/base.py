"""The cache-manager interface: a manager only *stores* K/V and carries out a policy's Decision."""

from __future__ import annotations

import numpy as np
import torch


class CacheManager:
    """Per-layer K/V storage plus the host-side bookkeeping every policy reads.

    Protocol per forward (driven by streamkv.decoder.Decoder):
      q_pos = begin(n_new)                       # RoPE positions of the new tokens
      k, v, mask = update(layer, k_new, v_new, rope)   # per layer; k_new un-rotated
      end()
    then, between steps: evict(keep) with the policy's kept slots.

    `token_pos` (host numpy, int64) holds the original text positions of the cached tokens in
    *cache order*, which is text order for every manager: policies read it and answer with
    `keep`, ascending indices into it. How a manager lays the tokens out in memory (slots) is its
    own business; `to_cache_order` maps a per-key tensor from the layout of the keys returned by
    `update` (the last dim by default) to cache order, for score-based policies that observe
    attention (identity for managers whose keys are already in cache order, like concat).
    """

    name = "base"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, position_mode: str = "shift", capacity: int | None = None,
                 side_capacity: int | None = None):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.position_mode = position_mode
        self.capacity = capacity  # upper bound on cached tokens (for preallocating managers)
        self.side_capacity = side_capacity  # expected non-window tokens (sinks + refresh), a hint
        self.reset()

    @classmethod
    def check(cls, cfg, bound: int | None = None) -> None:
        """Raise ConfigError if this manager cannot run `cfg` (policy, device, ...); `bound`: the tokens the
        policy holds during a step (None: unbounded)."""

    def reset(self) -> None:
        self.token_pos = np.zeros(0, dtype=np.int64)  # original text position per slot, cache order
        self.next_pos = 0  # text position of the next token fed

    def __len__(self) -> int:
        return len(self.token_pos)

    def begin(self, n_new: int) -> torch.Tensor:
        raise NotImplementedError

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, rope):
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def evict(self, keep: np.ndarray) -> None:
        raise NotImplementedError

    def query_position(self) -> int:
        """After a forward (before the prune): the RoPE position of the step's last query in the run's
        position scheme. "shift": its cache-order index (StreamingLLM's position; concat and static rotate
        at exactly these, ring and soft_ring at these plus a common offset, which RoPE does not see);
        "original": its text position. Host bookkeeping only (no device sync)."""
        if self.position_mode == "shift":
            return len(self) - 1
        return int(self.token_pos[-1])

    def to_cache_order(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """`x` indexed along `dim` like the keys `update` returned this step -> indexed in cache
        order (len(self) entries). Identity here: the keys are returned in cache order."""
        return x

    def nbytes(self) -> int:
        """Bytes of K/V storage held now (preallocating managers: everything they allocated)."""
        total = 0
        for name in ("k", "v"):
            for t in getattr(self, name, None) or []:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
