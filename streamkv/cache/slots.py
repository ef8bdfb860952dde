"""Shared machinery of the preallocating managers (ring, soft_ring, static).

Storage: one K and one V tensor for all layers, [n_layers, n_kv_heads, n_slots, head_dim],
allocated once. A cached token lives in one slot (the same slot index in every layer). The host
keeps, in cache order (= text order): the token's text position, its slot and, for side tokens,
its reference row (below). Subclasses only decide slot layout: where a new token goes
(`_alloc`), where the kept tokens go after a prune (`_relayout`), and which slots attention sees.

Positions ("shift" mode, StreamingLLM; docs/design.md, fact 2). The concat baseline gives the kept
tokens contiguous positions 0..n-1 in cache order and the query position n-1. RoPE scores depend
only on query-key distance, so shifting every position by the same offset changes nothing; we use
offset = t + 1 - n (t = the query's text position), which puts the query at its TRUE position t and
the cache-order token i at eff(i) = i + offset. For the *text suffix* (the longest run of cached
tokens with consecutive text positions ending at the newest token: the window) eff(i) equals the
true position, and it keeps doing so until the token is evicted. So:
  - every key is written once, rotated at its true text position, and window keys never change;
  - the query is rotated at its true position;
  - the other kept tokens ("side" tokens: sinks, refresh tokens, anything before a gap) need
    eff(i) > true position. They are a prefix of the cache order; offset changes only at prunes
    (it is constant between prunes: t and n grow together), so at every prune each side token is
    re-rotated to its new eff from a *reference row* kept in a small side buffer: the key as it was
    first stored (rotated at its true position p), rotated by eff - p >= 0. Always from the
    reference, never cumulatively: repeated rotation of a stored row drifts (float32 cos/sin are
    not exactly orthonormal; tests/test_rope.py shows it), one rotation from the reference is
    exact to ~1e-7 relative. A token gets its reference row the first time it becomes a side token
    (a copy of its slot's row, which still holds the true-position rotation). O(S + M) per prune.
"original" mode (score baselines, kvpress style): every key stays at its true position; there
are no side tokens, only relayout.

Sizes: `capacity` = the most tokens the cache holds (after a step's write, before its prune);
derived from the config by streamkv.sizing.cache_sizes. If a policy exceeds it, the buffers grow
(one copy, logged once, counted in stats["grows"]): correct, but not graph-friendly, so a policy
should declare its bound. Host bookkeeping is O(1) per step (preallocated host arrays); a prune
costs O(len) host numpy (like the policy's own `keep`), and on the device only what the subclass
says it moves.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from streamkv.cache.base import CacheManager
from streamkv.errors import ConfigError

log = logging.getLogger("streamkv")


class SlotCache(CacheManager):
    name = "slots"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, position_mode: str = "shift", capacity: int | None = None,
                 side_capacity: int | None = None):
        if capacity is None or capacity < 1:
            raise ValueError(f"{self.name}: a preallocating cache manager needs capacity >= 1 (got {capacity})")
        if position_mode not in ("shift", "original"):
            raise ValueError(f"{self.name}: unknown position_mode '{position_mode}'")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.position_mode = position_mode
        self.capacity = int(capacity)
        self.n_slots = self._slots_for(self.capacity)
        shape = (n_layers, n_kv_heads, self.n_slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        if position_mode == "shift":
            side = max(1, int(side_capacity or 1))
        else:
            side = 0
        self.side_k = torch.zeros((n_layers, n_kv_heads, side, head_dim), dtype=dtype, device=self.device)
        self._rope = None
        self._warned_grow = False
        self.reset()

    @classmethod
    def check(cls, cfg, bound: int | None = None) -> None:
        cap = cfg.cache.get("capacity")
        if cap is None:
            return
        if cap < 1:
            raise ConfigError(f"cache.capacity: must be >= 1 or null (derived from the policy) (got {cap})")
        if bound is not None and cap < bound:
            raise ConfigError(f"cache.capacity: {cap} is below what policy '{cfg.policy.name}' holds ({bound}); "
                              f"leave it null to derive it")
        if cap < cfg.prefill_tokens:
            raise ConfigError(f"cache.capacity: {cap} is below prefill_tokens={cfg.prefill_tokens}")

    # ------------------------------------------------------------------ sizes and stats

    def _slots_for(self, capacity: int) -> int:
        return capacity

    @property
    def side_slots(self) -> int:
        return self.side_k.shape[2]

    def nbytes(self) -> int:
        """All K/V storage this manager allocated: K and V slots plus the side reference keys."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.side_k))

    # ------------------------------------------------------------------ host bookkeeping

    def reset(self) -> None:
        self.next_pos = 0
        self._n = 0
        self._hpos = np.zeros(self.n_slots, dtype=np.int64)   # text position, cache order
        self._hslot = np.zeros(self.n_slots, dtype=np.int64)  # slot, cache order
        self._href = np.full(self.n_slots, -1, dtype=np.int64)  # side reference row or -1
        self._side_free = list(range(self.side_slots - 1, -1, -1))  # a stack
        self._order_idx = None  # device copy of the slots in cache order (to_cache_order)
        self._n_new = 0
        # token rows (one row = one token in all layers) per kind of device work
        self.stats = {"written": 0, "moved": 0, "side_v_moved": 0, "rotated": 0, "captured": 0,
                      "compactions": 0, "compacted": 0, "grows": 0}
        self._reset_layout()

    def _reset_layout(self) -> None:
        raise NotImplementedError

    @property
    def token_pos(self) -> np.ndarray:
        """Text positions in cache order: a view of the host buffer (no copy per step), valid until
        the next begin/evict; read it, don't write it."""
        return self._hpos[: self._n]

    @property
    def slots(self) -> np.ndarray:
        """Slot of each cached token, cache order (a view, like token_pos)."""
        return self._hslot[: self._n]

    def __len__(self) -> int:
        return self._n

    def _grow_host(self, n_slots: int) -> None:
        for name, fill in (("_hpos", 0), ("_hslot", 0), ("_href", -1)):
            old = getattr(self, name)
            new = np.full(n_slots, fill, dtype=np.int64)
            new[: len(old)] = old
            setattr(self, name, new)

    def _grow_buffers(self, capacity: int, copy_src: slice, copy_dst: slice) -> None:
        """Reallocate K/V for a larger capacity, copying rows copy_src -> copy_dst (one copy)."""
        if not self._warned_grow:
            log.warning("cache %s: the policy held more than capacity=%d tokens; growing to %d "
                        "(declare the policy's bound to keep shapes static)", self.name, self.capacity, capacity)
            self._warned_grow = True
        self.stats["grows"] += 1
        self.capacity = capacity
        self.n_slots = self._slots_for(capacity)
        with torch.inference_mode(False):  # begin() runs inside the decoder's inference mode
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.zeros((self.n_layers, self.n_kv_heads, self.n_slots, self.head_dim), dtype=self.dtype,
                                  device=self.device)
                new[:, :, copy_dst] = old[:, :, copy_src]
                setattr(self, name, new)
        self._grow_host(self.n_slots)

    def _alloc_side(self, count: int) -> np.ndarray:
        if count > len(self._side_free):
            old = self.side_slots
            new_size = max(2 * old, old + count - len(self._side_free))
            with torch.inference_mode(False):
                grown = torch.zeros((self.n_layers, self.n_kv_heads, new_size, self.head_dim), dtype=self.dtype,
                                    device=self.device)
                grown[:, :, :old] = self.side_k
            self.side_k = grown
            self._side_free = list(range(new_size - 1, old - 1, -1)) + self._side_free
            self.stats["grows"] += 1
        return np.array([self._side_free.pop() for _ in range(count)], dtype=np.int64)

    # ------------------------------------------------------------------ the step

    def begin(self, n_new: int) -> torch.Tensor:
        t0 = self.next_pos
        old = self._n
        new_slots = self._alloc(n_new)  # may compact or grow (then host arrays are re-laid out)
        end = old + n_new
        self._hpos[old:end] = np.arange(t0, t0 + n_new)
        self._hslot[old:end] = new_slots
        self._href[old:end] = -1
        self._n = end
        self._n_new = n_new
        self._order_idx = None
        self.stats["written"] += n_new
        self._q_pos = torch.arange(t0, t0 + n_new, device=self.device)
        self._new_slots = new_slots
        self._prepare_step(old, n_new, new_slots)
        return self._q_pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, rope):
        if rope is not self._rope:  # once per run: the table's attention scaling (cos at position 0)
            self._rope = rope
            self._rope_scale = float(rope.cos[0, 0])
        self._write(layer, rope.rotate(k, self._q_pos)[0], v[0])
        k_all, v_all = self._visible(layer)
        return k_all, v_all, self._mask

    def end(self) -> None:
        self.next_pos += self._n_new

    # ------------------------------------------------------------------ prune

    def evict(self, keep: np.ndarray) -> None:
        keep = np.asarray(keep, dtype=np.int64)
        n_old, n = self._n, len(keep)
        if n == n_old:
            return  # keep is every slot (ascending): nothing to do
        pos = self._hpos[keep]
        slot = self._hslot[keep]
        ref = self._href[keep]
        dropped = np.ones(n_old, dtype=bool)
        dropped[keep] = False
        dropped_slots = self._hslot[:n_old][dropped]
        freed_refs = self._href[:n_old][dropped]
        self._side_free.extend(int(r) for r in freed_refs[freed_refs >= 0])

        if self.position_mode == "shift":
            # eff - true position per kept token; 0 exactly on the text suffix (the window),
            # non-increasing in cache order, so the side tokens (g > 0) are a prefix
            g = (self.next_pos - n) - (pos - np.arange(n))
            n_side = int(np.count_nonzero(g))
            need = np.flatnonzero(ref[:n_side] < 0)
            if len(need):  # new side tokens: their slot still holds the true-position rotation
                rows = self._alloc_side(len(need))
                self.side_k[:, :, torch.as_tensor(rows, device=self.device)] = \
                    self.k[:, :, torch.as_tensor(slot[need], device=self.device)]
                ref[need] = rows
                self.stats["captured"] += len(need)
        else:
            g, n_side = None, 0

        new_slot = self._relayout(slot, n_side, dropped_slots)

        if n_side:
            dst = torch.as_tensor(new_slot[:n_side], device=self.device)
            src = self.side_k[:, :, torch.as_tensor(ref[:n_side], device=self.device)]
            self.k[:, :, dst] = self._rotate_by(src, g[:n_side])
            self.stats["rotated"] += n_side

        self._hpos[:n] = pos
        self._hslot[:n] = new_slot
        self._href[:n] = ref
        self._n = n
        self._order_idx = None

    def _rotate_by(self, x: torch.Tensor, delta: np.ndarray) -> torch.Tensor:
        """Rotate keys already rotated at some position p by `delta` more (RoPE composes)."""
        rope = self._rope
        out = rope.rotate(x, torch.as_tensor(delta, device=self.device))
        if self._rope_scale != 1.0:  # the table holds cos * attention_scaling: undo the second scaling
            out[..., : rope.rotary_dim] /= self._rope_scale
        return out

    def _move(self, src: np.ndarray, dst: np.ndarray, stat: str | None = "moved", k: bool = True,
              v: bool = True) -> None:
        """Copy token rows src -> dst (all layers; K and/or V) through a temporary: safe if they overlap."""
        if len(src) == 0:
            return
        if stat:
            self.stats[stat] += len(src)
        tensors = [t for t, on in ((self.k, k), (self.v, v)) if on]
        if len(src) > 1 and (np.diff(src) == 1).all() and (np.diff(dst) == 1).all():
            s, d, m = int(src[0]), int(dst[0]), len(src)
            for t in tensors:
                t[:, :, d:d + m] = t[:, :, s:s + m].clone() if abs(s - d) < m else t[:, :, s:s + m]
            return
        si = torch.as_tensor(src, device=self.device)
        di = torch.as_tensor(dst, device=self.device)
        for t in tensors:
            t.index_copy_(2, di, t.index_select(2, si))

    def _move_kept(self, slot: np.ndarray, new: np.ndarray, n_side: int) -> None:
        """Move the kept tokens whose slot changes: K and V rows of the non-side tokens, only the V
        rows of the side tokens (their keys are re-rotated from the reference rows into `new`)."""
        moving = slot != new
        keys = moving.copy()
        keys[:n_side] = False
        # one gather per tensor (a move may overwrite a row another move reads)
        self._move(slot[moving], new[moving], stat=None, k=False)
        self._move(slot[keys], new[keys], stat=None, v=False)
        self.stats["moved"] += int(keys.sum())
        self.stats["side_v_moved"] += int(moving[:n_side].sum())

    # ------------------------------------------------------------------ subclass hooks

    def _alloc(self, n_new: int) -> np.ndarray:
        """Slots for the step's new tokens (compacting or growing first if needed)."""
        raise NotImplementedError

    def _prepare_step(self, old: int, n_new: int, new_slots: np.ndarray) -> None:
        """Set self._mask (and anything update needs) for this step."""
        raise NotImplementedError

    def _write(self, layer: int, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def _visible(self, layer: int):
        raise NotImplementedError

    def _relayout(self, slot: np.ndarray, n_side: int, dropped_slots: np.ndarray) -> np.ndarray:
        """Carry out a prune: given the kept tokens' current slots (new cache order), free the
        dropped slots, move rows as the layout needs (the keys of the first n_side tokens are
        re-rotated from their reference rows into their new slots afterwards: move only their
        values; see _move_kept), return the new slots."""
        raise NotImplementedError


class ContiguousSlotCache(SlotCache):
    """Layouts whose live tokens occupy one contiguous run [lo, hi) of slots, in cache order: the
    keys attended are a view, no mask is needed for one new token, and keys are in cache order."""

    def _reset_layout(self) -> None:
        self._lo = 0
        self._hi = 0

    def _prepare_step(self, old: int, n_new: int, new_slots: np.ndarray) -> None:
        if n_new > 1:  # causal among the new tokens; every older token is visible
            total = old + n_new
            q_idx = torch.arange(old, total, device=self.device)[:, None]
            self._mask = torch.arange(total, device=self.device)[None, :] <= q_idx
        else:
            self._mask = None

    def _write(self, layer: int, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        a = int(self._new_slots[0])
        b = a + len(self._new_slots)
        self.k[layer, :, a:b] = k_rot
        self.v[layer, :, a:b] = v

    def _visible(self, layer: int):
        return self.k[layer, :, self._lo:self._hi][None], self.v[layer, :, self._lo:self._hi][None]
