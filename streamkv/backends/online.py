"""The graph path's decisions after a step, in the static layout: the compaction that follows a prune
(`Compaction`, capturable), and the host's decisions of an entropy-driven policy run *online*
(`OnlineDecisions`): after each replay the host mirrors the cache, asks the policy (its entropy read syncs
the GPU), and after a prune uploads the compaction and replays a small prune graph. Both move the kept
slots to the front of the slot cache (`gather`, streamkv/backends/graph_layers.py's SlotCache).
"""

from __future__ import annotations

import numpy as np
import torch

from streamkv.backends.schedule import BookkeepingCache, Schedule
from streamkv.backends.scored_eviction import kept_first
from streamkv.policies.base import StepView


def gather(c, perm) -> None:
    """Permute the slot cache's first C slots (keys, values, valid mask) by `perm` (one gather per tensor)."""
    C = c.capacity
    c.k[:, :, :C] = c.k[:, :, :C].index_select(2, perm)
    c.v[:, :, :C] = c.v[:, :, :C].index_select(2, perm)
    c.valid[:C] = c.valid[:C].index_select(0, perm)


class Compaction:
    """Static layout, after a prune: move the kept slots to the front; the permutation is computed from the
    device keep mask (kept slots first, in cache order), by the score-based policy (`scored`), or taken
    from the schedule's table (`perms`, one row per compaction) when a policy reorders the kept tokens
    (schedule.py). Reads device buffers only (capturable)."""

    def __init__(self, slots, scored, perms: torch.Tensor | None, device: torch.device):
        self.c, self.scored, self.perms = slots, scored, perms
        self.prune_ctr = torch.zeros(1, device=device, dtype=torch.int64)  # which row of `perms` is next

    def reset(self) -> None:
        self.prune_ctr.zero_()

    def __call__(self) -> None:
        c = self.c
        if self.scored is not None:
            gather(c, self.scored.compaction(c.valid))
        elif self.perms is None:
            gather(c, kept_first(c.valid[:c.capacity]))
        else:
            gather(c, self.perms.index_select(0, self.prune_ctr).view(-1))
        self.prune_ctr.add_(1)


class OnlineDecisions:
    """An entropy-driven policy on the static layout: the host's view of the cache (`book`), the policy's
    decision after every step, and the compaction a prune uploads (pinned host buffers -> device
    buffers, then `prune`, or its captured graph `prune_graph`). Fills the schedule's visible lengths and
    events as the run goes, as streamkv.evaluate does."""

    def __init__(self, policy, s: Schedule, slots, entropy: torch.Tensor, ids: np.ndarray,
                 device: torch.device):
        C = s.capacity
        self.policy, self.s, self.c, self.entropy, self.ids_np = policy, s, slots, entropy, ids
        self.book = BookkeepingCache(n_layers=0, n_kv_heads=0, head_dim=0, dtype=None, device=None,
                                     position_mode=s.position_mode, capacity=C)
        self.perm = torch.arange(C, device=device)
        self.valid = torch.zeros(C, device=device, dtype=torch.bool)
        pin = device.type == "cuda"
        self._perm_host = torch.zeros(C, dtype=torch.int64, pin_memory=pin)
        self._valid_host = torch.zeros(C, dtype=torch.bool, pin_memory=pin)
        self._uploaded = torch.cuda.Event() if pin else None  # the last upload has left the pinned buffers
        self.prune_graph = None  # captured `prune` (GraphEvaluator._capture)

    def reset(self) -> None:
        self.book.reset()
        self.policy.reset()
        self.s.events.clear()
        self.s.visible[:] = 0

    def prune(self) -> None:
        """Apply the compaction the host uploaded (kept slots first, in the policy's cache order) and the
        new valid mask (capturable: reads device buffers only)."""
        gather(self.c, self.perm)
        self.c.valid[:self.s.capacity].copy_(self.valid)

    def decide(self, t: int, n_new: int) -> None:
        """After the step (or the prefill) whose last input is text position t: mirror the cache, ask the
        policy (its entropy read, when it makes one, syncs the GPU: the price of a data-dependent policy)
        and apply a prune: bookkeeping, events and visible lengths as streamkv.evaluate does."""
        book, s = self.book, self.s
        book.begin(n_new)
        book.end()
        m, C = len(book.token_pos), s.capacity
        if m > C:
            raise RuntimeError(f"policy '{getattr(self.policy, 'name', '?')}' holds {m} tokens, more than its "
                               f"capacity {C} (streamkv.policies: `capacity` must bound the cache)")
        if n_new == 1:
            s.visible[t] = m - 1
        else:
            s.visible[:n_new] = np.arange(n_new)
        decision = self.policy.decide(StepView(token_pos=book.token_pos, step=t, entropy=self.entropy,
                                               token_ids=self.ids_np))
        if decision is None:
            return
        keep = np.asarray(decision.keep, dtype=np.int64)
        drop = np.setdiff1d(np.arange(m), keep, assume_unique=True)
        book.evict(keep)
        if self._uploaded is not None:  # a decision need not read the entropy (no sync since the last
            self._uploaded.synchronize()  # upload): wait until that copy has left the pinned buffers
        self._perm_host.copy_(torch.from_numpy(np.concatenate([keep, drop, np.arange(m, C)])))
        self._valid_host.zero_()
        self._valid_host[:len(keep)] = True
        self.perm.copy_(self._perm_host, non_blocking=True)
        self.valid.copy_(self._valid_host, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()
        if self.prune_graph is not None:
            self.prune_graph.replay()
        else:
            self.prune()
        s.events.append(decision.event(t, m))
