from __future__ import annotations

import numpy as np
import torch

from streamkv.cache.base import CacheManager


class ConcatCache(CacheManager):
    """The seed's baseline: torch.cat on every step, index_select on every prune (copies O(window)).

    Keys are stored un-rotated and re-rotated every step at their current positions, exactly as
    the original StreamingLLM code does (contiguous positions in cache order in "shift" mode;
    original text positions in "original" mode).
    """

    name = "concat"

    def reset(self) -> None:
        super().reset()
        self.k = [None] * self.n_layers
        self.v = [None] * self.n_layers

    def begin(self, n_new: int) -> torch.Tensor:
        old = len(self.token_pos)
        new_pos = np.arange(self.next_pos, self.next_pos + n_new)
        self.token_pos = np.concatenate([self.token_pos, new_pos])
        self._n_new = n_new
        total = old + n_new
        if self.position_mode == "shift":
            self._key_pos = torch.arange(total, device=self.device)
        else:
            self._key_pos = torch.as_tensor(self.token_pos, device=self.device)
        # causal mask among the new tokens (a single new token sees everything: no mask)
        if n_new > 1:
            q_idx = torch.arange(old, total, device=self.device)[:, None]
            self._mask = torch.arange(total, device=self.device)[None, :] <= q_idx
        else:
            self._mask = None
        return self._key_pos[old:]

    def update(self, layer, k, v, rope):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return rope.rotate(self.k[layer], self._key_pos), self.v[layer], self._mask

    def end(self) -> None:
        self.next_pos += self._n_new

    def evict(self, keep: np.ndarray) -> None:
        idx = torch.as_tensor(keep, device=self.device)
        for i in range(self.n_layers):
            self.k[i] = self.k[i].index_select(2, idx)
            self.v[i] = self.v[i].index_select(2, idx)
        self.token_pos = self.token_pos[keep]
