"""Score-based eviction inside the graph step (tova, h2o, snapkv; the base of refresh_select=attention):
each slot's text position and accumulated score live on the device, and a scheduled prune keeps the
top-scored slots without a host sync. Used by streamkv.backends.graph.GraphEvaluator."""

from __future__ import annotations

import numpy as np
import torch

from streamkv.backends.schedule import ScoredPlan
from streamkv.policies.h2o import QUERY_CHUNK, h2o_scores
from streamkv.policies.scored import attention_weights, rotate_by
from streamkv.policies.snapkv import pooled_scores
from streamkv.policies.tova import tova_scores


def kept_first(valid: torch.Tensor) -> torch.Tensor:
    """The compaction permutation of the static layout: valid slots first, then the freed ones, each in
    slot order (a stable sort of the mask: capturable, no host sync)."""
    return torch.sort((~valid).to(torch.uint8), stable=True).indices


class ScoredEviction:
    """Score-based policies inside the graph step (ring layout with original positions; static layout with
    positions=shift, compacted after each prune by `compaction`): which slots a prune evicts, decided on
    the device.

    The schedule says when a prune ends a step and how many tokens it keeps (ScoredPlan). Here, on the
    device: each slot's true text position (`slot_pos`, -1 = never written) and score (`acc`, float32),
    and at a prune the keep mask of streamkv.policies.scored.keep_top: the sinks (positions < n_sink),
    the n_recent newest (positions > newest - n_recent) and the n_top best-scored others (one topk over
    a key that orders by score, then the older first, as keep_top's stable sort). The scores are the
    eager policies' own functions (tova_scores, h2o_scores, pooled_scores) of attention_weights
    (softmax(q K^T * scale) against the valid slots):
      "last" (TOVA): the step's query, mean over heads, summed over layers;
      "accumulated" (H2O): the same / n_layers, summed over every query since the token was written
        (the prefill's causal rows included);
      "window" (SnapKV): the last obs_window queries of each layer (a ring), causal by position, mean
        over them, pooled along the keys in cache (= position) order, mean over heads, summed over
        layers; the observation window itself is not scored (always kept).
    A new token goes into the lowest free slot, computed here and stored into the schedule's
    write_slot[t] (where the Triton kv_update reads it). Static shapes, no host sync.

    TOVA's and SnapKV's scores are read only by a prune, so they are computed only on prune steps
    (`lazy`): the graph evaluator captures a step with scoring and one without (`scoring`, a Python
    flag fixed at capture) and replays the one the host schedule asks for. SnapKV's query ring is kept
    on every step; H2O accumulates every step. On the fused paths (`staged`) the Triton kv_update writes
    each layer's rotated query into its row of `qstage`, and a step without scoring moves all layers' rows
    into the ring with one copy at its end (`commit_queries`) instead of one copy per layer.
    """

    MAX_POS = 2**31 - 1

    def __init__(self, plan: ScoredPlan, capacity: int, n_layers: int, n_heads: int, head_dim: int, scale: float,
                 device, dtype, inv_freq=None):
        self.plan, self.C, self.n_layers, self.scale = plan, capacity, n_layers, scale
        self.inv_freq = inv_freq  # shift positions: SnapKV re-rotates its window's queries
        self.slot_pos = torch.full((capacity + 1,), -1, device=device, dtype=torch.int64)
        self.acc = torch.zeros(capacity + 1, device=device, dtype=torch.float32)
        self.prune = torch.as_tensor(plan.prune, device=device, dtype=torch.bool)
        self.window = plan.scores == "window"
        self.lazy = plan.scores != "accumulated"
        self.prune_steps = np.asarray(plan.prune, dtype=bool)  # host copy: which step graph to replay
        self.scoring = True
        self.staged = False  # set by the fused LayerStack: the step's queries are written into qstage
        if self.window:  # SnapKV: each layer's last w queries (rotated) in a ring, and their positions
            w = plan.n_recent
            self.qring = torch.zeros(n_layers, w, n_heads, head_dim, device=device, dtype=dtype)
            self.qstage = torch.zeros(n_layers, n_heads, head_dim, device=device, dtype=dtype)  # this step's
            self.qring_pos = torch.full((w,), self.MAX_POS, device=device, dtype=torch.int64)
            self.qring_rope = torch.zeros(w, device=device, dtype=torch.int64)  # RoPE position when rotated
            self.ar_w, self.ar_c = torch.arange(w, device=device), torch.arange(capacity, device=device)

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.acc.zero_()
        if self.window:
            self.qring.zero_()
            self.qring_pos.fill_(self.MAX_POS)
            self.qring_rope.zero_()

    # ---------------------------------------------------------------- decode step

    def begin_step(self, t, valid, qpos, write_slot):
        """The step's slot (the lowest free one), recorded in write_slot[t] and marked valid; its
        score starts at 0 (TOVA and SnapKV: every score is the current step's)."""
        ws = (~valid[:self.C]).to(torch.uint8).argmax().view(1)  # static: = the cache length (compacted)
        write_slot.index_copy_(0, t, ws)
        valid.index_fill_(0, ws, True)
        pos = t  # the step's text position (ring: also its RoPE position; static: qpos[t] = cache index)
        self.slot_pos.index_copy_(0, ws, pos)
        if self.plan.scores == "accumulated":
            self.acc.index_fill_(0, ws, 0.0)
        elif self.scoring:  # TOVA, SnapKV: only a scoring step fills (and a prune reads) the scores
            self.acc.zero_()
        if self.window:
            self.ring_row = torch.remainder(t, self.plan.n_recent)
            self.qring_pos.index_copy_(0, self.ring_row, pos)
            if self.scoring:
                self._window_order(t, valid[:self.C])
            if self.plan.shift:
                rope = qpos.index_select(0, t)
                self.qring_rope.index_copy_(0, self.ring_row, rope)
                if self.scoring:
                    self._window_delta(t, rope)
        return ws

    def record_query(self, i: int, q) -> None:
        """SnapKV, every decode step: layer i's rotated query q [1, H, 1, D] into its ring (staged and not
        scoring: left in qstage for commit_queries; a scoring step needs it in the ring before observe)."""
        if self.window and (self.scoring or not self.staged):
            self.qring[i].index_copy_(0, self.ring_row, q[0].transpose(0, 1))

    def commit_queries(self) -> None:
        """End of a staged step without scoring: every layer's query into the ring at once."""
        if self.window and self.staged and not self.scoring:
            self.qring.index_copy_(1, self.ring_row, self.qstage.unsqueeze(1))

    def observe(self, i: int, q, keys, valid) -> None:
        """Layer i of a scoring decode step (after record_query): q [1, H, 1, D] rotated; keys(layer) gives
        a layer's slot keys [Hkv, C, D] (rotated, slot order; keys(slice(None)): all layers, [L, Hkv, C, D]).
        SnapKV scores every layer at once after the last one (its queries are in the ring by then)."""
        if self.window:
            if i == self.n_layers - 1:
                self._window_scores(keys(slice(None)))
            return
        w = attention_weights(q, keys(i)[None], valid[:self.C].view(1, -1), self.scale)  # [Hkv, G, 1, C]
        if self.plan.scores == "last":
            self.acc[:self.C] += tova_scores(w)
        else:
            self.acc[:self.C] += h2o_scores(w, self.n_layers)

    def evict(self, t, valid, qpos) -> None:
        """End of decode step t: the scheduled prune (if any) keeps keep_top's slots."""
        if not self.scoring:  # a lazy policy's step without a prune
            return
        keep = self._keep(valid[:self.C], t)  # the newest token: text position t
        valid[:self.C] = torch.where(self.prune.index_select(0, t), keep, valid[:self.C])

    def compaction(self, valid):
        """Static layout, after a prune: the permutation that puts the kept slots first, in their
        current (= cache) order, then the freed ones (a stable sort of the keep mask: capturable);
        the per-slot state follows it. The caller gathers K, V and valid with it."""
        C = self.C
        perm = kept_first(valid[:C])
        self.slot_pos[:C] = self.slot_pos[:C].index_select(0, perm)
        self.acc[:C] = self.acc[:C].index_select(0, perm)
        return perm

    # ---------------------------------------------------------------- prefill (slots 0..P-1 = positions)

    def begin_prefill(self, P: int) -> None:
        self.slot_pos[:P] = torch.arange(P, device=self.slot_pos.device)
        if self.window:
            r = torch.arange(max(0, P - self.plan.n_recent), P, device=self.slot_pos.device)
            self.prefill_rows = (r, torch.remainder(r, self.plan.n_recent))
            self.qring_pos.index_copy_(0, self.prefill_rows[1], r)
            self.qring_rope.index_copy_(0, self.prefill_rows[1], r)  # the prefill: RoPE positions = text
            self.prefill_valid = self.ar_c < P
            self._window_order(P - 1, self.prefill_valid)
            if self.plan.shift:
                self._window_delta(P - 1, P - 1)

    def observe_prefill(self, i: int, q, k, keys) -> None:
        """Layer i of the prefill: q [1, H, P, D], k [1, Hkv, P, D] rotated (keys(layer): the slot keys, as
        in observe); H2O: the causal rows in its chunks; TOVA, SnapKV: only if a prune follows."""
        P, plan = q.shape[2], self.plan
        if self.window:
            r, row = self.prefill_rows
            self.qring[i].index_copy_(0, row, q[0].index_select(1, r).transpose(0, 1))
            if plan.prefill_prune and i == self.n_layers - 1:
                self._window_scores(keys(slice(None)))
            return
        if plan.scores == "last":  # the last query row sees every key
            if plan.prefill_prune:
                self.acc[:P] += tova_scores(attention_weights(q[:, :, -1:], k, None, self.scale))
            return
        idx = torch.arange(P, device=q.device)
        for a in range(0, P, QUERY_CHUNK):
            causal = idx[None, :] <= idx[a:a + QUERY_CHUNK, None]
            w = attention_weights(q[:, :, a:a + QUERY_CHUNK], k, causal, self.scale)
            self.acc[:P] += h2o_scores(w, self.n_layers)

    def end_prefill(self, P: int, valid) -> None:
        if self.plan.prefill_prune:
            valid[:self.C] = self._keep(valid[:self.C], P - 1)

    # ---------------------------------------------------------------- pieces

    def _keep(self, valid, newest):
        p, pos = self.plan, self.slot_pos[:self.C]
        middle = valid & (pos >= p.n_sink) & (pos <= newest - p.n_recent)
        keep = valid & ~middle
        if p.n_top:
            bits = self.acc[:self.C].view(torch.int32).to(torch.int64)  # scores >= 0: bit order = value order
            key = torch.where(middle, (bits << 32) | (self.MAX_POS - pos), -1)  # ties: the older first
            top = torch.zeros_like(keep).index_fill_(0, key.topk(p.n_top).indices, True)
            keep = keep | (top & middle)
        return keep

    def _window_order(self, newest, valid) -> None:
        """SnapKV, once per step: the ring rows oldest first, the slots in cache order, and which cache
        indices are scored (all but the observation window)."""
        w = self.plan.n_recent
        self.qorder = torch.remainder(newest + 1 + self.ar_w, w)
        self.order = torch.where(valid, self.slot_pos[:self.C], self.MAX_POS).sort().indices
        self.scored_n = self.ar_c < valid.sum() - w
        # the window queries' positions, oldest first, and which slots each one sees (causal by position):
        # the same for every layer of the step
        self.qorder_pos = self.qring_pos.index_select(0, self.qorder)
        self.qmask = valid[None, :] & (self.slot_pos[None, :self.C] <= self.qorder_pos[:, None])

    def _window_delta(self, newest, rope) -> None:
        """Shift positions (SnapKV as the eager policy): each window query at the position its token
        holds in the cache now, i.e. rotated by delta = (rope - (newest - its text position)) - the
        position it was rotated at (prunes since its step moved it towards the front); ring rows in
        qorder (oldest first)."""
        self.qdelta = (rope - (newest - self.qorder_pos)) - self.qring_rope.index_select(0, self.qorder)

    def _window_scores(self, keys) -> None:
        """snapkv_scores over the slots for all layers at once (keys [L, Hkv, C, D]; a few large kernels
        instead of a dozen per layer): queries oldest first, keys gathered into cache order (the window and
        the empty slots zeroed: the eager pooling's zero padding), scattered back. The layers' scores add
        up one layer after the other, in the order of the eager policy's sum."""
        C, plan = self.C, self.plan
        L, Hkv = keys.shape[:2]
        qs = self.qring.index_select(1, self.qorder).transpose(1, 2)  # [L, H, w, D]
        if plan.shift:
            qs = rotate_by(qs, self.qdelta, self.inv_freq)
        H, w, D = qs.shape[1:]
        # the layers' KV heads as one head axis: query head (l, h) attends KV head (l, h // G)
        attn = attention_weights(qs.reshape(1, L * H, w, D), keys.reshape(1, L * Hkv, C, D), self.qmask, self.scale)
        attn = attn.view(L, Hkv, H // Hkv, w, C)
        x = torch.where(self.scored_n, attn.mean(3).index_select(-1, self.order), 0.0)  # [L, Hkv, G, C]
        pooled = pooled_scores(x, plan.kernel_size, plan.pooling)  # [L, C]
        for layer in range(L):
            self.acc.index_add_(0, self.order, pooled[layer])
