"""ring: fixed capacity, never copies the window (docs/design.md, facts 2 and 3)."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from streamkv.cache.slots import SlotCache


class RingCache(SlotCache):
    """Fixed capacity; a new token overwrites a free slot (one a prune invalidated); a validity
    mask over all slots hides the empty ones. Slot order is arbitrary: attention is permutation-
    invariant over keys given their positions, so only positions and validity matter.

    Per step: one K and one V row written per layer, one mask element set; attention reads the
    whole buffer through the mask (no gather, no cat). Per prune: the dropped slots are marked
    invalid (O(dropped)); in "shift" mode the S + M side tokens (sinks, refresh tokens) are
    re-rotated in their own slots from their reference rows (O(S + M)). Window rows never move.
    Keys come back in slot order: policies map per-key tensors with `to_cache_order`.
    """

    name = "ring"

    def _reset_layout(self) -> None:
        self._free = deque(range(self.n_slots))
        self.valid = torch.zeros(self.n_slots, dtype=torch.bool, device=self.device)

    def _alloc(self, n_new: int) -> np.ndarray:
        if n_new > len(self._free):
            old = self.n_slots
            self._grow_buffers(max(2 * self.capacity, self._n + n_new), slice(0, old), slice(0, old))
            with torch.inference_mode(False):
                self.valid = torch.cat([self.valid, torch.zeros(self.n_slots - old, dtype=torch.bool,
                                                                device=self.device)])
            self._free.extend(range(old, self.n_slots))
        return np.array([self._free.popleft() for _ in range(n_new)], dtype=np.int64)

    def _prepare_step(self, old: int, n_new: int, new_slots: np.ndarray) -> None:
        if n_new == 1:
            idx = int(new_slots[0])
            self.valid[idx] = True
            self._new_idx = torch.tensor([idx], device=self.device)
            self._mask = self.valid[None, :]  # a view: [1 query, n_slots]
            return
        self._new_idx = torch.as_tensor(new_slots, device=self.device)
        self.valid[self._new_idx] = True
        mask = self.valid[None, :].repeat(n_new, 1)
        mask[:, self._new_idx] = torch.ones(n_new, n_new, dtype=torch.bool, device=self.device).tril()
        self._mask = mask

    def _write(self, layer: int, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(1, self._new_idx, k_rot)
        self.v[layer].index_copy_(1, self._new_idx, v)

    def _visible(self, layer: int):
        return self.k[layer][None], self.v[layer][None]

    def _relayout(self, slot: np.ndarray, n_side: int, dropped_slots: np.ndarray) -> np.ndarray:
        if len(dropped_slots):
            self.valid[torch.as_tensor(dropped_slots, device=self.device)] = False
            self._free.extend(int(s) for s in dropped_slots)
        return slot  # nothing moves: side tokens are re-rotated in place

    def to_cache_order(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self._order_idx is None:
            self._order_idx = torch.as_tensor(self._hslot[: self._n].copy(), device=self.device)
        return x.index_select(dim, self._order_idx)
