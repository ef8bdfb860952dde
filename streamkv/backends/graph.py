"""The `cudagraph` backends: the whole decode step on preallocated buffers, captured once as a CUDA
graph and replayed once per token. GraphEvaluator here: allocation, capture and replay, the prefill, the
step body and the run; the step's layers are streamkv/backends/graph_layers.py's, the compaction after a
prune and the online decisions streamkv/backends/online.py's, the timed loop streamkv/timing.py's.

One step (`_decode_step`) reads everything from device memory: the token id at `ids[t]` and the
slot schedule at `schedule[t]` (streamkv/backends/schedule.py) for a device step counter `t`; it
writes the step's K/V into its slot, re-rotates the scheduled sink/refresh slots (ring), attends
over the valid slots, scores the next token (NLL and entropy into device arrays at `t`), applies the
eviction that ends the step (slots marked invalid) and increments `t`. Score-based policies (tova,
h2o, snapkv) also score the valid slots with the step's query in every layer and, at a scheduled
prune, keep the top-scored slots (`ScoredEviction`): with original positions in the ring layout (their
write slot is the lowest free slot, computed on the device), with positions=shift in the static layout
(the compaction after a prune gathers with a permutation computed on the device from the keep mask:
kept slots first, in cache order; the write slot, = the cache length, is scheduled). The host only calls
`graph.replay()` per token (plus a compaction graph after a prune in the static layout): no host
sync, no per-token copies, no recompiles as the cache fills. Entropy-driven policies run *online* in
the static layout: the step takes its write slot from the valid mask, and after each replay the host
reads the entropy (one sync), asks the policy, and after a prune uploads the compaction and replays a
small prune graph (online.OnlineDecisions).

`cudagraph` runs the step's layers with PyTorch ops (SDPA for attention); `cudagraph_fused` with
liger-kernel's fused RMSNorm (+ residual add) and SwiGLU and our Triton kernels for RoPE + cache
write and split-KV decode attention (streamkv/backends/triton_kernels.py; a LayerNorm family, GPT-NeoX,
takes streamkv/backends/fused_neox.py's layers on the same family-neutral weights, prefill and
attention); `cudagraph_fused_gemv` (`fused_gemv=True`) also folds each add + RMSNorm into the GEMV after
it and SwiGLU into the down projection (streamkv/backends/gemv_kernels.py, `GemvOptions`).

The same class runs un-captured on the CPU (`capture=False`): that is how tests check the schedule,
the slot layouts and the positions against the concat manager in float32.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from streamkv.backends import functional as fn
from streamkv.backends.graph_layers import GemvOptions, LayerStack, SlotCache
from streamkv.backends.online import Compaction, OnlineDecisions, gather
from streamkv.backends.refresh_graph import RefreshEviction, RefreshPlan, refresh_schedule
from streamkv.backends.schedule import EntropyDependent, Schedule, Unschedulable, build_schedule, online_schedule
from streamkv.backends.scored_eviction import ScoredEviction, kept_first  # noqa: F401  (re-exported)
from streamkv.scoring import score
from streamkv.decoder import RotaryTable
from streamkv.evaluate import EvalResult
from streamkv.timing import capture_stream, sync, timed_decode

log = logging.getLogger("streamkv")

__all__ = ["GraphEvaluator", "GemvOptions", "ScoredEviction", "kept_first"]


class GraphEvaluator:
    """Evaluator for the cudagraph backends (same interface as streamkv.evaluate.Evaluator).

    `eager` is the host-driven Evaluator of the same run: a policy that cannot be scheduled
    (entropy-driven adaptive/refresh; tova, h2o and snapkv with original positions and layout="static",
    or positions=shift and layout="ring") runs through it, with a warning, and `backend_used` says so.
    """

    def __init__(self, eager, layout: str, fused: bool = False, capture: bool = True, tokenizer=None,
                 fused_gemv: bool = False, gemv: GemvOptions = GemvOptions()):
        self.eager = eager
        self.decoder, self.cache, self.policy, self.device = eager.decoder, eager.cache, eager.policy, eager.device
        self.layout, self.fused, self.capture = layout, fused, capture
        # cudagraph_fused_gemv: norm/SwiGLU prologues fused into the GEMVs (gemv_kernels.py)
        self.fused_gemv = bool(fused and fused_gemv)
        self.gemv = gemv
        self.tokenizer = tokenizer
        self.backend_name = ("cudagraph_fused_gemv" if self.fused_gemv else "cudagraph_fused") if fused else "cudagraph"
        self.backend_used = self.backend_name
        self.fallback_reason = None
        # family-neutral weights for every model; self.w.family (streamkv/backends/families.py) is the data a
        # step branches on. The fused kernels refuse the families (and models) they do not cover
        # (families.BACKEND_FAMILIES, check_backend_model).
        self.w = fn.gather_weights(self.decoder.model, self.backend_name)
        self._key = None
        self.memory: dict = {}

    # ------------------------------------------------------------------ setup

    def _ensure(self, ids: torch.Tensor, prefill: int) -> bool:
        """Schedule, buffers and graphs for this text; False if the policy cannot be scheduled."""
        key = (ids.data_ptr(), len(ids), prefill)
        if key == self._key:
            return self.fallback_reason is None
        self._key = key
        try:
            try:
                if getattr(self.policy, "scores_attention", False):  # refresh_select=attention: chosen on the device
                    sched = refresh_schedule(self.policy, self.layout, ids.cpu().numpy(), prefill)
                else:
                    sched = build_schedule(self.policy, self.layout, ids.cpu().numpy(), prefill, self.decoder,
                                           self.cache, self.tokenizer)
            except EntropyDependent as exc:
                if self.layout != "static":
                    raise EntropyDependent(f"{exc}; cache=static runs it online on the graph path") from exc
                sched = online_schedule(self.policy, len(ids), prefill)
        except Unschedulable as exc:
            self.fallback_reason = str(exc)
            self.backend_used = f"eager (fallback from {self.backend_name})"
            log.warning("backend=%s: policy '%s' cannot be precomputed (%s); running it on the eager path",
                        self.backend_name, getattr(self.policy, "name", "?"), exc)
            return False
        self.fallback_reason = None
        # online: the host decides after every step (one sync per token): a path of its own in the records
        self.backend_used = f"{self.backend_name} (online)" if sched.online else self.backend_name
        self._release_host_cache()
        with torch.inference_mode():
            self._allocate(sched, ids)
            if self.capture and len(ids) - 1 > prefill:
                self._capture()
        return True

    def _release_host_cache(self) -> None:
        """The host-driven manager built for this run (cache=ring/static) preallocates K/V that the
        graph path never reads (it keeps its own slot buffers): give that memory back, so that peak
        memory is weights + one preallocated cache. The manager stays usable for bookkeeping only."""
        for name in ("k", "v", "side_k"):
            t = getattr(self.cache, name, None)
            if isinstance(t, torch.Tensor) and t.numel():
                setattr(self.cache, name, t.new_empty((0,) * t.dim()))

    def _allocate(self, s: Schedule, ids: torch.Tensor) -> None:
        self.s = s
        dev, dt = self.device, self.decoder.dtype
        w = self.w
        L, Hkv, D, C = len(w.layers), w.n_kv_heads, w.head_dim, s.capacity
        self.graph = self.plain_graph = self.compact_graph = None
        # drop the previous text's buffers before measuring this one's
        self.slots = self.layers = self.compaction = self.decisions = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(dev)
        # the cache: C slots + 1 scratch slot (padding target of the schedule), per layer
        k = torch.zeros(L, Hkv, C + 1, D, device=dev, dtype=dt)
        v = torch.zeros_like(k)
        rotate_stored = self.layout == "ring"  # ring stores keys rotated; static rotates at read
        has_side = self.layout == "ring" and s.n_side > 0
        side = torch.zeros(L, Hkv, s.n_side + 1, D, device=dev, dtype=dt) if has_side else None
        valid = torch.zeros(C + 1, device=dev, dtype=torch.bool)
        kv_bytes = k.nbytes + v.nbytes + (side.nbytes if side is not None else 0)
        # the schedule and the text, on the device
        def put(a, dtype=torch.int64):
            return torch.as_tensor(np.ascontiguousarray(a), device=dev, dtype=dtype)

        self.ids = ids.to(dev)
        write_slot, qpos, side_write = put(s.write_slot), put(s.qpos), put(s.side_write)
        self.evict, self.evict_row = put(s.evict), put(s.evict_row)
        fix_slot, fix_src, fix_pos = put(s.fix_slot), put(s.fix_src), put(s.fix_pos)
        self.perms = put(s.perms, torch.int64) if len(s.perms) else None
        self.online = s.online
        self.scored = None
        if s.scored is not None:
            refresh = isinstance(s.scored, RefreshPlan)  # refresh_select=attention: the region chosen on the device
            self.scored = (RefreshEviction if refresh else ScoredEviction)(
                s.scored, C, L, w.n_heads, D, self.decoder.scale, dev, dt, self.decoder.base.rotary_emb.inv_freq)
            if refresh and self.layout == "ring":
                self.scored.bind(side_write, fix_slot, fix_src)
        self.t = torch.zeros(1, device=dev, dtype=torch.int64)
        n = s.n
        self.nll = torch.zeros(max(n - 1, 1), device=dev, dtype=torch.float32)
        self.entropy = torch.zeros_like(self.nll)
        self.top1 = torch.zeros_like(self.nll, dtype=torch.bool)
        # float32 cos/sin (from the same float64 angles as the eager table): the ring rotates keys at
        # large true positions, where bf16 cos/sin round differently from the small positions concat
        # uses; in float32 the rotation itself is exact to ~1e-7 and only the stored key is rounded.
        # Partial rotary (GPT-NeoX): the table has rotary_ndims columns and fn.rope rotates only those dims
        # (the step, the prefill, the sink/refresh re-rotation and the static layout's rotate-at-read).
        rot = self.decoder.base.rotary_emb
        table = RotaryTable(rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0)),
                            self.decoder.rope.max_positions, torch.float32)
        self.scale = self.decoder.scale
        self.slots = SlotCache(k=k, v=v, side=side, valid=valid, capacity=C, rotate_stored=rotate_stored,
                               cos=table.cos, sin=table.sin, write_slot=write_slot, qpos=qpos,
                               side_write=side_write, n_fix=s.n_fix, fix_slot=fix_slot, fix_src=fix_src,
                               fix_pos=fix_pos)
        # static layout: a compaction after each prune (score-based policies: its permutation from the device)
        self.compacting = self.layout == "static" and (bool(s.compact.any()) or self.scored is not None)
        self.compaction = Compaction(self.slots, self.scored, self.perms, dev)
        # online: the host's view of the cache, and the compaction a prune uploads (static layout)
        self.decisions = OnlineDecisions(self.policy, s, self.slots, self.entropy, ids.cpu().numpy(), dev) \
            if s.online else None
        # the step's layers, on the kernels of this backend (chosen once)
        kind = ("fused_gemv" if self.fused_gemv else "fused") if self.fused else "torch"
        self.layers = LayerStack(w, self.slots, self.scale, self.scored, kind, self.gemv)
        if dev.type == "cuda":
            total = torch.cuda.memory_allocated(dev) - before
            self.memory = {"kv_cache_bytes": kv_bytes, "kv_capacity_slots": C, "side_rows": s.n_side,
                           "schedule_and_buffers_bytes": total - kv_bytes}
        else:
            self.memory = {"kv_cache_bytes": kv_bytes, "kv_capacity_slots": C, "side_rows": s.n_side}

    @property
    def valid(self) -> torch.Tensor:
        """The slots' valid mask [C + 1] (the slot cache's)."""
        return self.slots.valid

    @property
    def n_fix(self) -> int:
        """Ring: the sink/refresh slots each step re-rotates (0: none)."""
        return self.slots.n_fix

    def _reset_state(self) -> None:
        c = self.slots
        c.k.zero_()
        c.v.zero_()
        if c.side is not None:
            c.side.zero_()
        c.valid.zero_()
        self.t.zero_()
        self.compaction.reset()
        self.nll.zero_()
        self.entropy.zero_()
        self.top1.zero_()
        if self.scored is not None:
            self.scored.reset()
        if self.online:
            self.decisions.reset()

    def _capture(self) -> None:
        P = self.s.prefill
        stream = capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        lazy = self.scored is not None and self.scored.lazy
        with torch.cuda.stream(stream):  # warm-up outside the graph: Triton JIT, cuBLAS handles
            for scoring in ((True, False) if lazy else (True,)):
                self._set_scoring(scoring)
                for _ in range(2):
                    self._reset_state()
                    self.t.fill_(P)
                    self._decode_step()
                    if self.compacting:
                        self.compaction()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._set_scoring(True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._decode_step()
        if lazy:  # the same step without the scoring, for the steps without a prune
            self._set_scoring(False)
            self.plain_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.plain_graph, pool=self.graph.pool()):
                self._decode_step()
            self._set_scoring(True)
        if self.compacting:
            self.compact_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.compact_graph, pool=self.graph.pool()):
                self.compaction()
        if self.online:
            with torch.cuda.stream(stream):
                self.decisions.prune()  # warm-up (the buffers hold the identity: a no-op)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.decisions.prune_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.decisions.prune_graph, pool=self.graph.pool()):
                self.decisions.prune()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ the step

    def _decode_step(self) -> None:
        """One token, entirely from device memory (capturable)."""
        t, w, c = self.t, self.w, self.slots
        if self.scored is not None:
            ws = self.scored.begin_step(t, c.valid, c.qpos, c.write_slot)  # (marks ws valid)
        else:
            if self.online:  # static layout, compacted: the write slot and the query's position = the cache length
                ws = (~c.valid[:c.capacity]).to(torch.uint8).argmax().view(1)
                c.write_slot.index_copy_(0, t, ws)
                c.qpos.index_copy_(0, t, ws)
            else:
                ws = c.write_slot.index_select(0, t)
            c.valid.index_fill_(0, ws, True)
        x = w.embed.index_select(0, self.ids.index_select(0, t)).unsqueeze(0)  # [1, 1, hidden]
        logits = self.layers(x, t, ws)
        nll, ent, top1 = score(logits, self.ids.index_select(0, t + 1), top1=True)
        self.nll.index_copy_(0, t, nll)
        self.entropy.index_copy_(0, t, ent)
        self.top1.index_copy_(0, t, top1)
        if self.scored is not None:
            self.scored.commit_queries()
            self.scored.evict(t, c.valid, c.qpos)
        else:
            evicted = self.evict.index_select(0, self.evict_row.index_select(0, t)).view(-1)
            c.valid.index_fill_(0, evicted, False)  # the step's eviction (row 0: the scratch slot only)
        self.t.add_(1)

    def _prefill(self, P: int) -> None:
        """The first P tokens in one forward pass (PyTorch ops, not captured), then the prune after it."""
        w, s, c = self.w, self.s, self.slots
        dev = self.device
        slots = c.write_slot[:P]
        if self.scored is not None:
            self.scored.begin_prefill(P)
        x = w.embed.index_select(0, self.ids[:P]).unsqueeze(0)
        cos, sin = c.cos[:P], c.sin[:P]
        dense = fn.DenseBlocks(w)
        for i in range(len(w.layers)):
            q, k, v = dense.qkv(i, x)  # [1, H, P, D]
            if c.has_side:
                c.side[i].index_copy_(1, c.side_write[:P], k[0])
            q, k_rot = fn.rope(q, cos, sin).to(q.dtype), fn.rope(k, cos, sin).to(k.dtype)
            c.k[i].index_copy_(1, slots, (k_rot if c.rotate_stored else k)[0])
            c.v[i].index_copy_(1, slots, v[0])
            if self.scored is not None:
                self.scored.observe_prefill(i, q, k_rot, c.observed_keys)
            a = fn.attend(q, k_rot, v, self.scale, causal=True, gqa=w.n_kv_heads != w.n_heads)
            x = dense.out(i, x, a.transpose(1, 2).reshape(1, P, -1))
        h = fn.final_norm(x, w)[0]
        for a in range(0, P, 512):  # the head in chunks: [P, vocab] float32 logits would dominate peak memory
            b = min(a + 512, P)
            self.nll[a:b], self.entropy[a:b], self.top1[a:b] = score(fn.lm_head(h[a:b], w), self.ids[a + 1:b + 1],
                                                                        top1=True)
        c.valid[slots] = True
        if self.scored is not None:
            self.scored.end_prefill(P, c.valid)
            if self.compacting and self.scored.plan.prefill_prune:
                gather(c, self.scored.compaction(c.valid))
        if len(s.prefill_evict):
            c.valid[torch.as_tensor(s.prefill_evict, device=dev)] = False
        if s.prefill_perm is not None:
            gather(c, torch.as_tensor(s.prefill_perm, device=dev, dtype=torch.int64))
        self.t.fill_(P)
        if self.online:
            self.decisions.decide(P - 1, P)

    def _set_scoring(self, on: bool) -> None:
        if self.scored is not None:
            self.scored.scoring = on

    def _replay(self, t: int) -> None:
        # lazy scored policies: score only on the steps that end with a prune
        scoring = self.scored is None or not self.scored.lazy or bool(self.scored.prune_steps[t])
        if self.graph is not None:
            (self.graph if scoring or self.plain_graph is None else self.plain_graph).replay()
            if self.s.compact[t]:
                self.compact_graph.replay()
        else:
            self._set_scoring(scoring)
            self._decode_step()
            if self.s.compact[t]:
                self.compaction()
        if self.online:
            self.decisions.decide(t, 1)

    # ------------------------------------------------------------------ the Evaluator interface

    def warm_up(self, ids: torch.Tensor, prefill: int, steps: int) -> None:
        if not self._ensure(ids, prefill):
            return self.eager.warm_up(ids, prefill, steps)
        if steps <= 0:
            return
        with torch.inference_mode():
            self._reset_state()
            if prefill:
                self._prefill(prefill)
            else:
                self.t.fill_(0)
            for t in range(prefill, min(prefill + steps, len(ids) - 1)):
                self._replay(t)
        sync(self.device)

    def run(self, ids: torch.Tensor, prefill: int) -> EvalResult:
        if not self._ensure(ids, prefill):
            return self.eager.run(ids, prefill)
        n, s = len(ids), self.s
        with torch.inference_mode():
            self._reset_state()
            # self._prefill / self._replay looked up per run: tests and scripts wrap them
            timing = timed_decode(self.device, n, prefill, self._prefill, self._replay)
        ids_np = ids.cpu().numpy()
        return EvalResult(
            index=np.arange(1, n), token_id=ids_np[1:], nll=self.nll[:n - 1].cpu().numpy(),
            entropy=self.entropy[:n - 1].cpu().numpy(), visible_kv=s.visible.copy(), events=list(s.events),
            top1=self.top1[:n - 1].cpu().numpy(), max_position=self._max_position(n), **timing.fields())

    def _max_position(self, n: int) -> int:
        """The largest RoPE position of a query in the run's position scheme (as
        CacheManager.query_position): static layout, the query positions the step used (`qpos`, read back
        from the device: online runs write it there); ring layout with StreamingLLM positions, the query
        sits at its true position t and the oldest cached key is rotated at t - visible[t] (schedule.py,
        `required`), so its StreamingLLM position is visible[t]; original positions: the true ones."""
        s = self.s
        if self.layout == "static":
            return int(self.slots.qpos[:n - 1].max())
        if s.position_mode == "shift":
            return int(s.visible[:n - 1].max())
        return int(s.qpos[:n - 1].max())
