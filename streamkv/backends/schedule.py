"""Host-precomputed slot schedules: what lets a data-independent policy run inside one CUDA graph.

With teacher forcing, a policy that reads only the cache's bookkeeping (positions held, step
counter, the text's token ids) decides the same thing whatever the model computes. So the whole run's
decisions can be simulated on the host before the first token, with the real policy object and a
bookkeeping-only cache, and turned into per-step tensors that a captured decode step reads at
`schedule[step]` from a device step counter: no host sync, no recompiles, static shapes.

Two slot layouts (the two preallocated managers):

* ``ring`` (docs/design.md, fact 2): a token is written once into a free slot and never moves. Its key is
  stored rotated at its true text position, so the query (at its true position) sees the recent
  window at exactly StreamingLLM's distances. Tokens separated from the query by a gap (sinks,
  refresh tokens) need StreamingLLM's contiguous position instead: the schedule lists them per step
  as *fixes* (slot, side-buffer row, position), and the step re-rotates their un-rotated copy kept
  in a small side buffer into their slot: O(sinks + refresh) work per step, never O(window).
  Eviction = marking slots invalid; a later token reuses the slot.
* ``static``: slots are the cache order (compacted after each prune by a gather) and keys are stored
  un-rotated; the step rotates every key at its slot index, i.e.
  the StreamingLLM positions, as the concat manager does. When every prune keeps its tokens in cache
  order (all our policies), the compaction permutation (kept slots first, then the freed ones) is a
  stable sort of the step's valid mask, computed on the device: no table. Otherwise the schedule holds
  one permutation per prune ([n_prunes, capacity]: 280 MB of int64 for strict streaming on 20k tokens).

Score-based policies with a device scoring rule (`ScoredPolicy.device_scores`: tova, h2o, snapkv) are
half-scheduled: the cache length evolves the same whatever the scores (a prune fires on the length
alone and always keeps keep_top's count), so the prune steps, visible lengths, RoPE positions and
events are precomputed (`ScoredPlan`); which slots a prune frees is computed on the device
(streamkv.backends.scored_eviction.ScoredEviction). Original positions (policy.positions=original): ring layout
(the write slot of every decode step is the lowest free slot, computed on the device). StreamingLLM
positions (policy.positions=shift): static layout (the write slot is the cache length, scheduled; the
query's RoPE position is its cache index; a compaction follows each prune, its permutation computed on
the device from the keep mask). The other combinations raise Unschedulable (eager fallback).

The refresh policy with refresh_select=attention is half-scheduled the same way, in both layouts
(streamkv.backends.refresh_graph: the refresh region chosen by score on the device).

Any other policy that reads model outputs (entropy, attention scores) cannot be scheduled: the
simulation hands it a StepView whose `entropy` raises `EntropyDependent` on any use, and a policy that
registers an attention observer without a device scoring rule is refused up front (`DataDependent`).
Entropy-driven policies (adaptive mode=entropy, refresh_select=entropy) then run *online* in the static
layout (`online_schedule`): the captured step takes its write slot and RoPE position from the device's
valid mask (the cache length), the host reads the step's entropy (one sync per step), asks the policy,
and after a prune uploads the compaction (permutation + valid mask) and replays a small prune graph.
Everything else falls back to the eager path with a warning (see streamkv/backends/__init__.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from streamkv.cache.base import CacheManager
from streamkv.policies import StepView
from streamkv.policies.scored import ScoredPolicy, keep_top

LAYOUTS = ("ring", "static")


class Unschedulable(Exception):
    """The run cannot be precomputed as a slot schedule (the message says why)."""


class DataDependent(Unschedulable):
    """The policy's decision depends on model outputs (entropy, attention scores)."""


class EntropyDependent(DataDependent):
    """The policy's decisions read the predictive entropy (and nothing else the model computes): the
    static layout runs it online (`online_schedule`), the host deciding after each step."""


class _NoData:
    """StepView.entropy during the simulation: any use means the policy reads model outputs."""

    def _refuse(self, *args, **kwargs):
        raise EntropyDependent("the policy reads the predictive entropy")

    __getitem__ = __len__ = __iter__ = __array__ = __bool__ = __float__ = __int__ = _refuse
    cpu = numpy = item = tolist = float = _refuse

    def __getattr__(self, name):
        self._refuse()


@dataclass
class ScoredPlan:
    """A score-based policy (tova, h2o, snapkv) on the ring layout: *when* a prune ends a step and *how many*
    tokens it keeps are scheduled (the cache length evolves the same whatever the scores: a prune
    always brings it back to keep_top's count); *which* tokens stay is decided on the device
    (streamkv.backends.scored_eviction.ScoredEviction): the sinks, the n_recent newest and the n_top
    best-scored others."""

    scores: str  # "last" (TOVA: the step's query), "accumulated" (H2O: every query since the write),
    #              "window" (SnapKV: the last n_recent = obs_window queries, pooled)
    n_sink: int
    n_recent: int
    n_top: int
    prune: np.ndarray  # [n] bool: a prune ends decode step t
    prefill_prune: bool  # a prune follows the prefill
    kernel_size: int = 1  # SnapKV's pooling
    pooling: str = "avg"
    shift: bool = False  # StreamingLLM positions (static layout): SnapKV re-positions its window's queries


class BookkeepingCache(CacheManager):
    """A cache manager that only keeps the bookkeeping (token_pos, next_pos): no tensors."""

    name = "bookkeeping"

    def begin(self, n_new: int):
        self.token_pos = np.concatenate([self.token_pos, np.arange(self.next_pos, self.next_pos + n_new)])
        self._n_new = n_new
        return None

    def end(self) -> None:
        self.next_pos += self._n_new

    def evict(self, keep: np.ndarray) -> None:
        self.token_pos = self.token_pos[keep]


@dataclass
class Schedule:
    layout: str
    position_mode: str
    n: int  # text length; tokens 0..n-2 are fed
    prefill: int
    capacity: int  # slots (the most tokens held at once, the step's own token included)
    n_side: int  # side-buffer rows (ring): tokens that need re-rotation at some point
    # per text position t (the token fed at step t; prefill tokens use their own rows):
    write_slot: np.ndarray  # [n] slot the token is written to
    qpos: np.ndarray  # [n] RoPE position of the token as a query (and of its key when written)
    side_write: np.ndarray  # [n] side-buffer row for the un-rotated key, or n_side (a scratch row)
    evict: np.ndarray  # [1 + n_prunes, E] slots freed by each prune; row 0 frees none; padded with `capacity`
    #                    (a scratch slot). Per prune, not per step: R = 512 on 20k tokens would be 82 MB
    evict_row: np.ndarray  # [n] the row of `evict` applied after step t (0: no prune)
    fix_slot: np.ndarray  # [n, F] slots to re-rotate before step t's attention (pad: capacity);
    #                       non-empty on the first step after a prune (and never in original mode)
    fix_src: np.ndarray  # [n, F] their side-buffer rows (pad: n_side)
    fix_pos: np.ndarray  # [n, F] the positions to rotate them at (pad: 0)
    prefill_evict: np.ndarray  # slots freed by the prune after prefill (any number)
    # static layout only: a slot permutation after every prune (kept slots first)
    compact: np.ndarray  # [n] bool: step t ends with a compaction
    perms: np.ndarray  # [n_compactions, capacity] int32 (decode steps, in order); [0, capacity] when every
    #                    prune keeps cache order: the permutation is then the device's kept-first sort
    prefill_perm: np.ndarray | None
    visible: np.ndarray  # [n-1] visible cached tokens per step (as the evaluator records)
    events: list = field(default_factory=list)
    scored: ScoredPlan | None = None  # score-based policy: which slots go is decided on the device
    online: bool = False  # entropy-driven policy: decided by the host after each step (online_schedule)

    @property
    def n_fix(self) -> int:
        return self.fix_slot.shape[1]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.write_slot, self.qpos, self.side_write, self.evict, self.evict_row,
                                       self.fix_slot,
                                       self.fix_src, self.fix_pos, self.perms))


def device_scored_slots(layout: str, n: int, prefill: int, capacity: int, visible: np.ndarray):
    """(qpos, write_slot) of a schedule whose evictions are chosen on the device. Ring: true positions, and
    the write slot = capacity, i.e. the device writes the lowest free slot; static: the cache length before
    the step's token is its slot and its StreamingLLM position. The prefill fills slots 0..P-1 of an empty
    cache at positions 0..P-1 in both layouts."""
    qpos = np.arange(n, dtype=np.int64)
    write_slot = np.full(n, capacity, dtype=np.int64)
    if layout == "static":
        write_slot[prefill:n - 1] = qpos[prefill:n - 1] = visible[prefill:]
    write_slot[:prefill] = np.arange(prefill)
    return qpos, write_slot


def _pad(rows: list, width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), max(width, 1)), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def build_schedule(policy, layout: str, ids: np.ndarray, prefill: int, decoder=None, cache=None,
                   tokenizer=None) -> Schedule:
    """Simulate `policy` over the text `ids` exactly as streamkv.evaluate.Evaluator drives it (prefill,
    then one token per step, a decision after each) and lay the result out in slots.

    Raises Unschedulable (DataDependent) if the policy needs model outputs or the layout cannot hold it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if getattr(policy, "scores_attention", False):  # refresh_select=attention: refresh_graph.refresh_schedule
        raise DataDependent("refresh_select=attention chooses on the device (streamkv.backends.refresh_graph."
                            "refresh_schedule schedules it)")
    scores = getattr(policy, "device_scores", None)  # tova, h2o: scored on the device (ring layout)
    observes = decoder is not None and getattr(decoder, "attention_observer", None) is not None
    if (observes or isinstance(policy, ScoredPolicy)) and scores is None:
        raise DataDependent("the policy observes attention scores")
    mode = getattr(policy, "position_mode", "shift")
    if layout == "static" and mode != "shift":
        raise Unschedulable(f"the static layout keeps StreamingLLM positions only; policy "
                            f"'{getattr(policy, 'name', policy)}' uses position_mode='{mode}' (use cache=ring)")
    if layout == "ring" and mode == "shift" and scores is not None:
        raise Unschedulable(f"the ring layout keeps true positions, and policy '{policy.name}' with "
                            f"positions=shift may keep any token before a gap (use cache=static)")
    n = len(ids)
    if scores is not None:
        return _scored_schedule(policy, scores, n, prefill, layout)
    book = BookkeepingCache(n_layers=0, n_kv_heads=0, head_dim=0, dtype=None, device=None, position_mode=mode,
                            capacity=getattr(cache, "capacity", None))
    if cache is not None:  # re-attach the policy to the bookkeeping cache for the simulation, then back
        policy.attach(decoder, book, tokenizer)
    policy.reset()
    try:
        feeds = _simulate(policy, book, ids, prefill, n)
    finally:
        policy.reset()
        if cache is not None:
            policy.attach(decoder, cache, tokenizer)
    return _layout(feeds, layout, mode, n, prefill)


def _simulate(policy, book, ids, prefill, n):
    """One entry per feed step: (step t, new token positions, held after the write (cache order),
    kept indices or None, the decision, is_prefill)."""
    feeds = []
    nodata = _NoData()

    def feed(new_tokens, t, is_prefill):
        book.begin(len(new_tokens))
        held = book.token_pos.copy()
        book.end()
        decision = policy.decide(StepView(token_pos=book.token_pos, step=t, entropy=nodata, token_ids=ids))
        keep = None
        if decision is not None:
            keep = np.asarray(decision.keep, dtype=np.int64)
            book.evict(keep)
        feeds.append((t, new_tokens, held, keep, decision, is_prefill))

    if prefill:
        feed(np.arange(prefill), prefill - 1, True)
    for t in range(prefill, n - 1):
        feed(np.array([t]), t, False)
    return feeds


# tests: keep the per-prune permutation table even when the device's kept-first sort gives the same
PERM_TABLE_ALWAYS = False


def _layout(feeds, layout, mode, n, prefill) -> Schedule:
    write_slot = np.zeros(n, dtype=np.int64)
    qpos = np.arange(n, dtype=np.int64)  # true positions (ring; prefill of both layouts)
    visible = np.zeros(max(n - 1, 0), dtype=np.int32)
    evict_rows: list = [[] for _ in range(n)]
    fix_rows: list = [[] for _ in range(n)]  # (slot, token, position)
    dropped_at: list = [[] for _ in range(n)]  # tokens dropped by the prune that ends step t
    compact = np.zeros(n, dtype=bool)
    perms: list = []
    kept_in_order = True  # every decode-step prune keeps cache order: no permutation table needed
    prefill_perm, prefill_evict = None, np.zeros(0, dtype=np.int64)
    events = []
    capacity = 0

    slot_of: dict = {}
    stored: dict = {}  # ring: the position each held token's key is rotated at in its slot
    free: deque = deque()  # ring: freed slots, reused oldest first
    next_slot = 0
    for t, new, held, keep, decision, is_prefill in feeds:
        m = len(held)
        capacity = max(capacity, m)
        if is_prefill:
            visible[:prefill] = np.arange(prefill)
        else:
            visible[t] = m - 1
            if layout == "static":
                qpos[t] = m - 1
        # 1. write the new tokens (they are the last len(new) entries of `held`)
        for i, j in enumerate(new):
            j = int(j)
            if layout == "ring":
                if free:
                    s = free.popleft()
                else:
                    s, next_slot = next_slot, next_slot + 1
                slot_of[j] = s
                stored[j] = j
            else:  # static: the slot is the cache-order index
                s = m - len(new) + i
            write_slot[j] = s
        # 2. ring + shift positions: held tokens whose stored rotation is not StreamingLLM's distance
        #    to the query: everything before the last gap (sinks, refresh tokens). That distance only
        #    changes at a prune (between prunes the query and the cache grow together), so a slot is
        #    re-rotated on the first step after each prune, not every step.
        if layout == "ring" and mode == "shift" and not is_prefill:
            required = t - (m - 1 - np.arange(m))
            for c in np.flatnonzero(held != required):
                j = int(held[c])
                if stored.get(j) != int(required[c]):
                    fix_rows[t].append((slot_of[j], j, int(required[c])))
                    stored[j] = int(required[c])
        # 3. the policy's prune
        if keep is None:
            continue
        drop = np.setdiff1d(np.arange(m), keep, assume_unique=True)
        dropped_at[t] = [int(j) for j in held[drop]]
        if layout == "ring":
            slots = [slot_of.pop(j) for j in dropped_at[t]]
            free.extend(slots)
            for j in dropped_at[t]:
                stored.pop(j, None)
        else:
            slots = [int(c) for c in drop]
            perm = np.concatenate([keep, drop])
            kept_in_order &= bool(np.all(np.diff(keep) > 0))
            if is_prefill:
                prefill_perm = perm
            else:
                compact[t] = True
                perms.append(perm)
        if is_prefill:
            prefill_evict = np.asarray(slots, dtype=np.int64)
        else:
            evict_rows[t] = slots
        events.append(decision.event(t, m))

    # Side buffer (ring + shift): an un-rotated copy of every token that will ever need a fix, kept
    # from its write until its eviction; rows are reused.
    ever_fixed = {j for rows in fix_rows for (_, j, _) in rows}
    side_of: dict = {}
    side_free: deque = deque()
    n_side = 0
    side_write = np.full(n, -1, dtype=np.int64)
    fix_at: dict = {}
    for t, new, held, keep, decision, is_prefill in feeds:
        for j in new:
            j = int(j)
            if j in ever_fixed:
                if side_free:
                    r = side_free.popleft()
                else:
                    r, n_side = n_side, n_side + 1
                side_of[j] = r
                side_write[j] = r
        fix_at[t] = [(slot, side_of[j], pos) for (slot, j, pos) in fix_rows[t]]
        for j in dropped_at[t]:
            if j in side_of:
                side_free.append(side_of.pop(j))
    side_write[side_write < 0] = n_side  # the scratch row

    width = max((len(r) for r in fix_at.values()), default=0)
    rows = [fix_at.get(t, []) for t in range(n)]
    fix_slot = _pad([[s for s, _, _ in r] for r in rows], width, capacity)[:, :width]
    fix_src = _pad([[q for _, q, _ in r] for r in rows], width, n_side)[:, :width]
    fix_pos = _pad([[p for _, _, p in r] for r in rows], width, 0)[:, :width]
    pruned = [t for t in range(n) if evict_rows[t]]
    evict = _pad([[]] + [evict_rows[t] for t in pruned], max((len(r) for r in evict_rows), default=0), capacity)
    evict_row = np.zeros(n, dtype=np.int64)
    evict_row[pruned] = np.arange(1, len(pruned) + 1)
    if kept_in_order and not PERM_TABLE_ALWAYS:
        perms = []
    perm_arr = np.zeros((len(perms), capacity), dtype=np.int32)
    for i, p in enumerate(perms):
        perm_arr[i, :len(p)] = p
        perm_arr[i, len(p):] = np.arange(len(p), capacity)
    if prefill_perm is not None:
        prefill_perm = np.concatenate([prefill_perm, np.arange(len(prefill_perm), capacity)]).astype(np.int32)
    return Schedule(layout=layout, position_mode=mode, n=n, prefill=prefill, capacity=capacity, n_side=n_side,
                    write_slot=write_slot, qpos=qpos, side_write=side_write, evict=evict, evict_row=evict_row,
                    fix_slot=fix_slot, fix_src=fix_src, fix_pos=fix_pos, prefill_evict=prefill_evict, compact=compact,
                    perms=perm_arr,
                    prefill_perm=prefill_perm, visible=visible, events=events)


def online_schedule(policy, n: int, prefill: int) -> Schedule:
    """The tables of an online run (static layout, decisions made by the host after each step): sized
    by the policy's capacity; the decode steps' write slots and positions are filled on the device, the
    events and visible lengths by the host as the run goes (streamkv.backends.online.OnlineDecisions.decide)."""
    mode = getattr(policy, "position_mode", "shift")
    if mode != "shift":
        raise Unschedulable(f"the static layout keeps StreamingLLM positions only; policy "
                            f"'{getattr(policy, 'name', policy)}' uses position_mode='{mode}'")
    C = max(int(policy.capacity), prefill)  # the prefill is written before the first decision
    empty = np.zeros((n, 0), dtype=np.int64)
    return Schedule(layout="static", position_mode=mode, n=n, prefill=prefill, capacity=C, n_side=0,
                    write_slot=np.arange(n, dtype=np.int64), qpos=np.arange(n, dtype=np.int64),
                    side_write=np.zeros(n, dtype=np.int64), evict=np.full((1, 1), C, dtype=np.int64),
                    evict_row=np.zeros(n, dtype=np.int64), fix_slot=empty, fix_src=empty, fix_pos=empty,
                    prefill_evict=np.zeros(0, dtype=np.int64), compact=np.zeros(n, dtype=bool),
                    perms=np.zeros((0, C), dtype=np.int32), prefill_perm=None,
                    visible=np.zeros(max(n - 1, 0), dtype=np.int32), events=[], online=True)


def _scored_schedule(policy, scores: str, n: int, prefill: int, layout: str = "ring") -> Schedule:
    """A score-based policy. The host schedules the prunes (ScoredPolicy.due of the cache length)
    and their sizes; which slots stay is computed on the device.

    ring (original positions: no fixes, no side buffer): the write slots of the decode steps and the
    evicted slots are computed on the device too (their rows here are placeholders: `capacity`, the
    scratch slot).
    static (positions=shift): the kept slots are compacted to the front after every prune (in cache
    order, by a permutation computed on the device from the keep mask), so the cache order is the slot
    order and the length after each prune is fixed: a token is written at slot = the cache length
    before it, and its RoPE position as a query is that index (StreamingLLM's)."""
    S, n_recent, budget = policy.n_sink, policy.n_recent, policy.budget
    n_top = max(0, budget - S - n_recent)
    length = capacity = 0
    visible = np.zeros(max(n - 1, 0), dtype=np.int32)
    prune = np.zeros(n, dtype=bool)
    events: list = []

    def feed(t: int, n_new: int) -> bool:
        nonlocal length, capacity
        length += n_new
        capacity = max(capacity, length)
        if not policy.due(length):
            return False
        kept = len(keep_top(np.zeros(length), length, S, n_recent, budget))
        if S + n_recent > length or kept != S + n_recent + n_top:  # the device keeps sinks + n_recent + n_top
            raise Unschedulable(f"policy '{policy.name}': a prune of {length} tokens keeps {kept}, not "
                                f"n_sink + n_recent + top = {S + n_recent + n_top}")
        events.append({"step": int(t), "dropped": length - kept, "kept": kept, "visible_before": length,
                       "visible_after": kept, "refreshed": 0})
        length = kept
        return True

    prefill_prune = False
    if prefill:
        visible[:prefill] = np.arange(prefill)
        prefill_prune = feed(prefill - 1, prefill)
    for t in range(prefill, n - 1):
        visible[t] = length
        prune[t] = feed(t, 1)
    static = layout == "static"
    qpos, write_slot = device_scored_slots(layout, n, prefill, capacity, visible)
    none = np.zeros((n, 0), dtype=np.int64)
    plan = ScoredPlan(scores=scores, n_sink=S, n_recent=n_recent, n_top=n_top, prune=prune,
                      prefill_prune=prefill_prune, shift=static)
    if scores == "window":
        plan.kernel_size, plan.pooling = int(policy.pcfg.kernel_size), str(policy.pcfg.pooling)
    return Schedule(layout=layout, position_mode="shift" if static else "original", n=n, prefill=prefill,
                    capacity=capacity, n_side=0, write_slot=write_slot, qpos=qpos,
                    side_write=np.zeros(n, dtype=np.int64), evict=np.full((1, 1), capacity, dtype=np.int64),
                    evict_row=np.zeros(n, dtype=np.int64),
                    fix_slot=none, fix_src=none, fix_pos=none, prefill_evict=np.zeros(0, dtype=np.int64),
                    compact=prune.copy() if static else np.zeros(n, dtype=bool),
                    perms=np.zeros((0, capacity), dtype=np.int32), prefill_perm=None, visible=visible,
                    events=events, scored=plan)
