"""static: preallocated, compacts in place on prune (the middle ground)."""

from __future__ import annotations

import numpy as np

from streamkv.cache.slots import ContiguousSlotCache


class StaticCache(ContiguousSlotCache):
    """Preallocated [capacity] slots; the cached tokens always occupy slots [0, n) in cache order
    (like HF's StaticCache). A new token is written at slot n. A prune compacts in place: every
    kept token whose slot changes is gathered towards the front (index_select into a temporary of
    the moved rows, then copied back): O(window) rows per prune, like concat, but into the same
    memory (no allocation of the cache, no cat per step). Side tokens (shift mode) go to the front
    slots re-rotated from their reference rows; window keys move without re-rotation (they are
    stored at their true positions).
    """

    name = "static"

    def _alloc(self, n_new: int) -> np.ndarray:
        if self._n + n_new > self.n_slots:
            old = self._n
            self._grow_buffers(max(2 * self.capacity, self._n + n_new), slice(0, old), slice(0, old))
        a = self._n
        self._hi = a + n_new
        return np.arange(a, a + n_new, dtype=np.int64)

    def _relayout(self, slot: np.ndarray, n_side: int, dropped_slots: np.ndarray) -> np.ndarray:
        n = len(slot)
        new = np.arange(n, dtype=np.int64)
        self._move_kept(slot, new, n_side)
        self._lo, self._hi = 0, n
        return new
