"""soft_ring: a double-size buffer; prunes move a start index, one copy only at wrap-around."""

from __future__ import annotations

import numpy as np

from streamkv.cache.slots import ContiguousSlotCache


class SoftRingCache(ContiguousSlotCache):
    """Buffer of 2 x capacity slots; the cached tokens occupy one contiguous run [lo, hi) in
    cache order. A new token is appended at hi. A prune keeps the window (the kept tail) where it
    is and only moves `lo`; the few side tokens (sinks, refresh tokens; shift mode) are re-rotated
    from their reference rows into the slots just before the window, O(S + M). Attention reads the
    view [lo, hi). When hi reaches the end of the buffer, the live run is copied once to the front
    (a compaction: O(window) every >= capacity steps, amortized O(1) per step; the two regions
    never overlap since the buffer is twice the capacity).
    In "original" mode (score baselines: arbitrary keeps) the kept tokens before the kept tail are
    gathered (moved, without re-rotation) to sit just before it.
    """

    name = "soft_ring"

    def _slots_for(self, capacity: int) -> int:
        return 2 * capacity

    def _alloc(self, n_new: int) -> np.ndarray:
        live = self._n
        if live + n_new > self.capacity:  # the policy holds more than declared: grow (copy once)
            self._grow_buffers(max(2 * self.capacity, live + n_new), slice(self._lo, self._hi), slice(0, live))
            self._shift_host(self._lo)
        elif self._hi + n_new > self.n_slots:  # wrap-around: one copy of the live run to the front
            self.stats["compactions"] += 1
            self._move(np.arange(self._lo, self._hi), np.arange(0, live), stat="compacted")
            self._shift_host(self._lo)
        a = self._hi
        self._hi = a + n_new
        return np.arange(a, a + n_new, dtype=np.int64)

    def _shift_host(self, by: int) -> None:
        self._hslot[: self._n] -= by
        self._hi -= by
        self._lo -= by

    def _relayout(self, slot: np.ndarray, n_side: int, dropped_slots: np.ndarray) -> np.ndarray:
        n = len(slot)
        hi = self._hi
        new = np.arange(hi - n, hi, dtype=np.int64)
        # shift mode: the tokens after the side prefix are the text suffix, already at [hi - tail, hi):
        # only the side tokens move (their values; their keys are re-rotated into the new slots)
        self._move_kept(slot, new, n_side)
        self._lo = hi - n
        return new
