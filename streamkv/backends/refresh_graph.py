"""The refresh policy's attention-driven selection (refresh_select=attention, refresh_keep=fifo|score) on the
graph path: which tokens of an evicted segment join the refresh region is decided on the device, inside the
step, by the SnapKV score that streamkv.backends.scored_eviction.ScoredEviction computes for snapkv.

Half-scheduled, as the score-based baselines: the cache length evolves the same whatever the scores (a prune
fires on the body length, drops n tokens, refreshes min(M, n) of them, and the region holds min(B, r + picks)),
so the host simulates the policy with a stand-in selection (uniform, fifo: the same counts) and schedules the
prune steps, visible lengths, events and per prune the first text position the body keeps (`seg_end`: the
segment is the body before it). On the device, at a prune: the segment's top M by score join the region's
candidates, of which the region keeps B (fifo: the newest; score: the best-scored under the same queries);
the sinks, the region and the rest of the body stay.

Layouts:
* ring: keys rotated at their true positions; the sinks and the refresh region sit before a gap and need
  StreamingLLM's positions, which change only at a prune, so the prune writes the next step's *fix* rows
  (slots of sinks + region in cache order; their positions are data-independent and scheduled): the step
  re-rotates them from an un-rotated copy of every token (side buffer, one row per slot, since any token may
  be refreshed). The write slot (the lowest free one) and its side row are computed on the device.
* static: keys un-rotated, rotated at the slot index; the kept slots compacted after each prune by the
  kept-first permutation of the keep mask (cache order), as snapkv with positions=shift.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from streamkv.backends.scored_eviction import ScoredEviction
from streamkv.backends.schedule import (BookkeepingCache, DataDependent, EntropyDependent, Schedule, ScoredPlan,
                                        _simulate, device_scored_slots)


@dataclass
class RefreshPlan(ScoredPlan):
    """ScoredPlan (scores="window") of the refresh policy: the segment of a prune is the body before
    seg_end[t] (text position; the prefill's prune: row prefill - 1)."""

    budget: int = 0  # B: the refresh region's size
    per_prune: int = 0  # M: refreshed per prune (at most)
    keep: str = "fifo"  # fifo | score
    seg_end: np.ndarray | None = None  # [n] first text position the body keeps after the prune of step t


def refresh_schedule(policy, layout: str, ids: np.ndarray, prefill: int) -> Schedule:
    """The schedule of a refresh policy with refresh_select=attention (see the module docstring)."""
    n = len(ids)
    sim = copy.copy(policy)  # the same counts with a data-independent selection
    sim.refresh_select, sim.refresh_keep, sim._window = "uniform", "fifo", None
    sim.reset()
    book = BookkeepingCache(n_layers=0, n_kv_heads=0, head_dim=0, dtype=None, device=None, position_mode="shift")
    try:
        feeds = _simulate(sim, book, ids, prefill, n)
    except EntropyDependent as exc:  # the online path runs the host's decisions, which need the scores
        raise DataDependent(f"{exc} and the refresh selection reads attention scores") from exc
    B, S0 = policy.refresh_budget, policy.n_sink
    ring = layout == "ring"
    visible = np.zeros(max(n - 1, 0), dtype=np.int32)
    prune = np.zeros(n, dtype=bool)
    seg_end = np.zeros(n, dtype=np.int64)
    fixes: dict = {}  # ring: step -> positions of the sinks + region, in cache order
    events, capacity, r, prefill_prune = [], 0, 0, False
    for t, new, held, keep, decision, is_prefill in feeds:
        m = len(held)
        capacity = max(capacity, m)
        if is_prefill:
            visible[:prefill] = np.arange(prefill)
        else:
            visible[t] = m - 1
        if keep is None:
            continue
        S = min(S0, m)
        r = min(B, r + decision.refreshed)
        body = len(keep) - S - r  # the body's kept tokens: the newest
        seg_end[t] = held[m - body]
        events.append(decision.event(t, m))
        if is_prefill:
            prefill_prune = True
        else:
            prune[t] = True
        if t + 1 < n:  # the next step: cache index c at position (t + 1) - (len(keep) - c)
            fixes[t + 1] = t + 1 - len(keep) + np.arange(S + r)
    qpos, write_slot = device_scored_slots(layout, n, prefill, capacity, visible)
    width = min(S0 + B, capacity) if ring else 0
    fix_pos = np.zeros((n, width), dtype=np.int64)
    for t, p in fixes.items():
        if ring:
            fix_pos[t, :len(p)] = p
    n_side = capacity if ring else 0  # one side row per slot: any token may be refreshed
    side_write = np.full(n, n_side, dtype=np.int64)
    side_write[:prefill] = np.arange(prefill)
    p = policy.pcfg
    plan = RefreshPlan(scores="window", n_sink=S0, n_recent=int(p.obs_window), n_top=0, prune=prune,
                       prefill_prune=prefill_prune, kernel_size=int(p.kernel_size), pooling=str(p.pooling),
                       shift=not ring, budget=B, per_prune=policy.refresh_per_prune, keep=policy.refresh_keep,
                       seg_end=seg_end)
    return Schedule(layout=layout, position_mode="shift", n=n, prefill=prefill, capacity=capacity, n_side=n_side,
                    write_slot=write_slot, qpos=qpos, side_write=side_write,
                    evict=np.full((1, 1), capacity, dtype=np.int64), evict_row=np.zeros(n, dtype=np.int64),
                    fix_slot=np.full((n, width), capacity, dtype=np.int64),
                    fix_src=np.full((n, width), n_side, dtype=np.int64), fix_pos=fix_pos,
                    prefill_evict=np.zeros(0, dtype=np.int64), compact=np.zeros(n, dtype=bool) if ring else prune.copy(),
                    perms=np.zeros((0, capacity), dtype=np.int32), prefill_perm=None, visible=visible,
                    events=events, scored=plan)


class RefreshEviction(ScoredEviction):
    """ScoredEviction whose prune keeps the sinks, the refresh region (chosen by score from the region and
    the segment's top M) and the body after the segment; tracks which slots hold the region (`is_ref`) and,
    in the ring layout, writes the write slot's side row and the next step's fix rows."""

    def __init__(self, plan: RefreshPlan, capacity: int, *args, **kwargs):
        super().__init__(plan, capacity, *args, **kwargs)
        dev = self.slot_pos.device
        self.is_ref = torch.zeros(capacity + 1, device=dev, dtype=torch.bool)
        self.seg_end = torch.as_tensor(plan.seg_end, device=dev, dtype=torch.int64)
        self.tables = None

    def bind(self, side_write, fix_slot, fix_src) -> None:
        """Ring layout: the evaluator's schedule tables this class writes on the device."""
        self.tables = (side_write, fix_slot, fix_src)
        self.ar_f = torch.arange(fix_slot.shape[1], device=fix_slot.device)

    def reset(self) -> None:
        super().reset()
        self.is_ref.zero_()
        if self.tables is not None:
            _, fix_slot, fix_src = self.tables
            fix_slot.fill_(self.C)  # the scratch slot and side row (n_side = capacity)
            fix_src.fill_(self.C)

    def begin_step(self, t, valid, qpos, write_slot):
        ws = super().begin_step(t, valid, qpos, write_slot)
        if self.tables is not None:
            self.tables[0].index_copy_(0, t, ws)  # the token's un-rotated key: side row = its slot
        return ws

    def evict(self, t, valid, qpos) -> None:
        if not self.scoring:  # a step without a prune
            return
        C = self.C
        on = self.prune.index_select(0, t)
        keep, ref = self._refresh_keep(valid[:C], self.seg_end.index_select(0, t))
        valid[:C] = torch.where(on, keep, valid[:C])
        self.is_ref[:C] = torch.where(on, ref, self.is_ref[:C])
        self._write_fixes(t + 1, on, valid[:C])

    def end_prefill(self, P: int, valid) -> None:
        if not self.plan.prefill_prune:
            return
        C, dev = self.C, valid.device
        keep, ref = self._refresh_keep(valid[:C], self.seg_end[P - 1])
        valid[:C] = keep
        self.is_ref[:C] = ref
        self._write_fixes(torch.tensor([P], device=dev), torch.ones(1, dtype=torch.bool, device=dev), keep)

    def compaction(self, valid):
        perm = super().compaction(valid)
        self.is_ref[:self.C] = self.is_ref[:self.C].index_select(0, perm)
        return perm

    # ---------------------------------------------------------------- pieces

    def _top(self, mask, key, k: int):
        """The k entries of `mask` with the largest `key` (>= 0); all of them if fewer."""
        k = min(k, self.C)
        if k <= 0:
            return torch.zeros_like(mask)
        idx = torch.where(mask, key, -1).topk(k).indices
        return torch.zeros_like(mask).index_fill_(0, idx, True) & mask

    def _refresh_keep(self, valid, seg_end):
        """(keep mask, region mask) of the prune (lazy.py's decide, by slot): see the module docstring."""
        p, C = self.plan, self.C
        pos = self.slot_pos[:C]
        sink = valid & (pos < p.n_sink)
        ref = valid & self.is_ref[:C]
        body = valid & ~sink & ~ref
        seg = body & (pos < seg_end)
        bits = self.acc[:C].view(torch.int32).to(torch.int64)  # scores >= 0: bit order = value order
        by_score = (bits << 32) | (self.MAX_POS - pos)  # ties: the older first (keep_top's, top_by_score's)
        cand = ref | self._top(seg, by_score, p.per_prune)
        region = self._top(cand, by_score if p.keep == "score" else pos, p.budget)
        return sink | region | (body & ~seg), region

    def _write_fixes(self, row, on, keep) -> None:
        """Ring: the slots of the sinks and the region in cache order (the rest: the scratch slot) as the
        fix rows of step `row` (the step after the prune), where the prune happens (`on`)."""
        if self.tables is None:
            return
        _, fix_slot, fix_src = self.tables
        C, F = self.C, fix_slot.shape[1]
        pos = self.slot_pos[:C]
        pre_gap = keep & ((pos < self.plan.n_sink) | self.is_ref[:C])
        order = torch.where(pre_gap, pos, self.MAX_POS).sort().indices[:F]
        slots = torch.where(self.ar_f < pre_gap.sum(), order, C)
        for table in (fix_slot, fix_src):  # side row = slot
            table.index_copy_(0, row, torch.where(on, slots, table.index_select(0, row).view(-1)).view(1, -1))
