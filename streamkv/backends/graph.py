"""The `cudagraph` backends: the whole decode step on preallocated buffers, captured once as a CUDA
graph and replayed once per token.

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
small prune graph (`_online_decide`).

`cudagraph` runs the step with PyTorch ops (SDPA for attention); `cudagraph_fused` swaps in
liger-kernel's fused RMSNorm (+ residual add) and SwiGLU and our Triton kernels for RoPE + cache
write and split-KV decode attention (streamkv/backends/triton_kernels.py); for a LayerNorm family
(GPT-NeoX) the layer stack between the attentions is streamkv/backends/fused_neox.py's (LayerNorm and
GELU kernels) instead of liger's, on the same family-neutral weights, prefill and attention;
`cudagraph_fused_gemv` (`fused_gemv=True`) also folds each add + RMSNorm into the GEMV after it and
SwiGLU into the down projection (streamkv/backends/gemv_kernels.py).

The same class runs un-captured on the CPU (`capture=False`): that is how tests check the schedule,
the slot layouts and the positions against the concat manager in float32.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamkv.backends import functional as fn
from streamkv.backends.schedule import (BookkeepingCache, EntropyDependent, Schedule, Unschedulable,
                                        build_schedule, online_schedule)
from streamkv.evaluate import EvalResult, _reset_peak, step_durations_ms
from streamkv.policies.base import StepView
from streamkv.scoring import score
from streamkv.backends.scored_eviction import ScoredEviction, kept_first  # noqa: F401  (re-exported)

log = logging.getLogger("streamkv")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STREAMS: dict = {}


def _capture_stream(device) -> "torch.cuda.Stream":
    """One side stream per device for warm-up and capture: cuBLAS keeps a workspace (32 MiB on Hopper)
    per stream it has seen, so a new stream per capture would add one per run of a sweep."""
    key = str(device)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


@dataclass(frozen=True)
class GemvOptions:
    """cudagraph_fused_gemv (`fused_gemv=True`): replace liger's add + RMSNorm and SwiGLU kernels and the
    cuBLAS GEMV after each by one Triton kernel (streamkv/backends/gemv_kernels.py): 3 launches fewer per
    layer (+ the final norm fused into the LM head). Its own backend name, not a change of cudagraph_fused,
    so that records made with either stay comparable (docs/benchmarks.md has both, measured in one call)."""

    # also fuse the final add + RMSNorm into the LM head GEMV (a large, bandwidth-bound GEMV, where our
    # kernel must match cuBLAS's bandwidth to gain the launch)
    lm_head: bool = True
    # weights larger than this (bytes) keep liger + cuBLAS (bandwidth-bound GEMVs of big models: on an
    # H100 cuBLAS beats our kernel from ~10 MB up, by more than the saved launch, see docs/benchmarks.md);
    # None: every GEMV fused. Smaller weights also take our plain kernel for o_proj.
    max_bytes: int | None = 4 << 20
    # False = the one-pass norm prologue (y = rstd * W @ (s * gamma): the weight loads do not wait for the
    # norm; h not rounded to bf16 before the dot, see gemv_kernels.py); True = HF's roundings.
    exact: bool = True


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
        self.k = self.v = self.side = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(dev)
        # the cache: C slots + 1 scratch slot (padding target of the schedule), per layer
        self.k = torch.zeros(L, Hkv, C + 1, D, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.rotate_stored = self.layout == "ring"  # ring stores keys rotated; static rotates at read
        self.has_side = self.layout == "ring" and s.n_side > 0
        self.side = torch.zeros(L, Hkv, s.n_side + 1, D, device=dev, dtype=dt) if self.has_side else None
        self.valid = torch.zeros(C + 1, device=dev, dtype=torch.bool)
        kv_bytes = self.k.nbytes + self.v.nbytes + (self.side.nbytes if self.side is not None else 0)
        # the schedule and the text, on the device
        def put(a, dtype=torch.int64):
            return torch.as_tensor(np.ascontiguousarray(a), device=dev, dtype=dtype)

        self.ids = ids.to(dev)
        self.write_slot, self.qpos, self.side_write = put(s.write_slot), put(s.qpos), put(s.side_write)
        self.evict, self.evict_row = put(s.evict), put(s.evict_row)
        self.n_fix = s.n_fix
        self.fix_slot, self.fix_src, self.fix_pos = put(s.fix_slot), put(s.fix_src), put(s.fix_pos)
        self.perms = put(s.perms, torch.int64) if len(s.perms) else None
        self.online = s.online
        if s.online:  # the host's view of the cache, and the compaction a prune uploads (static layout)
            self.book = BookkeepingCache(n_layers=0, n_kv_heads=0, head_dim=0, dtype=None, device=None,
                                         position_mode=s.position_mode, capacity=C)
            self.ids_np = ids.cpu().numpy()
            self.online_perm = torch.arange(C, device=dev)
            self.online_valid = torch.zeros(C, device=dev, dtype=torch.bool)
            pin = dev.type == "cuda"
            self._perm_host = torch.zeros(C, dtype=torch.int64, pin_memory=pin)
            self._valid_host = torch.zeros(C, dtype=torch.bool, pin_memory=pin)
            self._uploaded = torch.cuda.Event() if pin else None  # the last upload has left the pinned buffers
            self.prune_graph = None
        self.scored = None
        if s.scored is not None:
            from streamkv.backends.refresh_graph import RefreshEviction, RefreshPlan

            refresh = isinstance(s.scored, RefreshPlan)  # refresh_select=attention: the region chosen on the device
            self.scored = (RefreshEviction if refresh else ScoredEviction)(
                s.scored, C, L, w.n_heads, D, self.decoder.scale, dev, dt, self.decoder.base.rotary_emb.inv_freq)
            if refresh and self.layout == "ring":
                self.scored.bind(self.side_write, self.fix_slot, self.fix_src)
        # static layout: a compaction after each prune (score-based policies: its permutation from the device)
        self.compacting = self.layout == "static" and (bool(s.compact.any()) or self.scored is not None)
        self.t = torch.zeros(1, device=dev, dtype=torch.int64)
        self.prune_ctr = torch.zeros(1, device=dev, dtype=torch.int64)
        n = s.n
        self.nll = torch.zeros(max(n - 1, 1), device=dev, dtype=torch.float32)
        self.entropy = torch.zeros_like(self.nll)
        self.top1 = torch.zeros_like(self.nll, dtype=torch.bool)
        # float32 cos/sin (from the same float64 angles as the eager table): the ring rotates keys at
        # large true positions, where bf16 cos/sin round differently from the small positions concat
        # uses; in float32 the rotation itself is exact to ~1e-7 and only the stored key is rounded.
        # Partial rotary (GPT-NeoX): the table has rotary_ndims columns and fn.rope rotates only those dims
        # (the step, the prefill, the sink/refresh re-rotation and the static layout's rotate-at-read).
        from streamkv.decoder import RotaryTable

        rot = self.decoder.base.rotary_emb
        table = RotaryTable(rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0)),
                            self.decoder.rope.max_positions, torch.float32)
        self.cos, self.sin = table.cos, table.sin
        self.scale = self.decoder.scale
        if self.fused:
            from streamkv.backends.triton_kernels import DecodeAttention

            self.attn = DecodeAttention(w.n_heads, Hkv, D, C, dev, dt, rotate_k=self.layout == "static",
                                        rotary_dim=self.cos.shape[-1])
            self.q_rot = torch.empty(w.n_heads, D, device=dev, dtype=dt)
        if dev.type == "cuda":
            total = torch.cuda.memory_allocated(dev) - before
            self.memory = {"kv_cache_bytes": kv_bytes, "kv_capacity_slots": C, "side_rows": s.n_side,
                           "schedule_and_buffers_bytes": total - kv_bytes}
        else:
            self.memory = {"kv_cache_bytes": kv_bytes, "kv_capacity_slots": C, "side_rows": s.n_side}

    def _reset_state(self) -> None:
        self.k.zero_()
        self.v.zero_()
        if self.side is not None:
            self.side.zero_()
        self.valid.zero_()
        self.t.zero_()
        self.prune_ctr.zero_()
        self.nll.zero_()
        self.entropy.zero_()
        self.top1.zero_()
        if self.scored is not None:
            self.scored.reset()
        if self.online:
            self.book.reset()
            self.policy.reset()
            self.s.events.clear()
            self.s.visible[:] = 0

    def _capture(self) -> None:
        P = self.s.prefill
        stream = _capture_stream(self.device)
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
                        self._compact()
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
                self._compact()
        if self.online:
            with torch.cuda.stream(stream):
                self._online_prune()  # warm-up (the buffers hold the identity: a no-op)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.prune_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.prune_graph, pool=self.graph.pool()):
                self._online_prune()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ the step

    def _decode_step(self) -> None:
        """One token, entirely from device memory (capturable)."""
        t = self.t
        w = self.w
        if self.scored is not None:
            ws = self.scored.begin_step(t, self.valid, self.qpos, self.write_slot)
        elif self.online:  # static layout, compacted: the write slot and the query's position = the cache length
            ws = (~self.valid[:self.s.capacity]).to(torch.uint8).argmax().view(1)
            self.write_slot.index_copy_(0, t, ws)
            self.qpos.index_copy_(0, t, ws)
        else:
            ws = self.write_slot.index_select(0, t)
        self.valid.index_fill_(0, ws, True)
        x = w.embed.index_select(0, self.ids.index_select(0, t)).unsqueeze(0)  # [1, 1, hidden]
        if self.fused_gemv:
            logits = self._layers_fused_gemv(x, t)
        else:
            x = self._layers_fused(x, t) if self.fused else self._layers_torch(x, t, ws)
            logits = fn.lm_head(x.view(1, -1), w)
        nll, ent, top1 = score(logits, self.ids.index_select(0, t + 1), top1=True)
        self.nll.index_copy_(0, t, nll)
        self.entropy.index_copy_(0, t, ent)
        self.top1.index_copy_(0, t, top1)
        if self.scored is not None:
            self.scored.evict(t, self.valid, self.qpos)
        else:
            evicted = self.evict.index_select(0, self.evict_row.index_select(0, t)).view(-1)
            self.valid.index_fill_(0, evicted, False)  # the step's eviction (row 0: the scratch slot only)
        self.t.add_(1)

    def _layers_torch(self, x, t, ws):
        w = self.w
        C = self.s.capacity
        pos = self.qpos.index_select(0, t)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, rotary_ndims]
        if self.has_side:
            sw = self.side_write.index_select(0, t)
        if self.n_fix:
            fix_slot = self.fix_slot.index_select(0, t).view(-1)
            fix_src = self.fix_src.index_select(0, t).view(-1)
            fpos = self.fix_pos.index_select(0, t).view(-1)
            fcos, fsin = self.cos.index_select(0, fpos), self.sin.index_select(0, fpos)
        mask = self.valid[:C].view(1, 1, 1, C)
        G = w.n_heads // w.n_kv_heads
        dense = fn.DenseBlocks(w)  # one code path for every family: what differs is data (w.family)
        for i in range(len(w.layers)):
            q, k, v = dense.qkv(i, x)  # [1, H, 1, D], un-rotated
            if self.has_side:
                self.side[i].index_copy_(1, sw, k[0])
            q = fn.rope(q, cos, sin).to(q.dtype)
            if self.rotate_stored:
                k = fn.rope(k, cos, sin).to(k.dtype)
            self.k[i].index_copy_(1, ws, k[0])
            self.v[i].index_copy_(1, ws, v[0])
            if self.n_fix:
                fixed = fn.rope(self.side[i].index_select(1, fix_src), fcos, fsin).to(self.k.dtype)
                self.k[i].index_copy_(1, fix_slot, fixed)
            keys = self.k[i, :, :C]
            if not self.rotate_stored:  # static: StreamingLLM positions = slot index
                keys = fn.rope(keys, self.cos[:C], self.sin[:C]).to(keys.dtype)
            if self.scored is not None:
                self._observe(i, q, lambda: keys)
            qg = q.reshape(1, w.n_kv_heads, G, w.head_dim)  # GQA: a KV head's query heads as rows
            a = fn.attend(qg, keys.unsqueeze(0), self.v[i, :, :C].unsqueeze(0), self.scale, mask=mask)
            x = dense.out(i, x, a.reshape(1, 1, -1))
        return fn.final_norm(x, w)

    def _layers_fused(self, x, t):
        if self.w.family.norm == "layer":  # GPT-NeoX: LayerNorm + GELU kernels (fused_neox.py)
            from streamkv.backends.fused_neox import neox_layers_fused

            return neox_layers_fused(self, x, t)
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

        w = self.w
        x = x.view(1, -1)
        h = LigerRMSNormFunction.apply(x, w.layers[0].ln1, w.eps, 0.0, "llama", False)
        for i, lw in enumerate(w.layers):
            a = self._attend_fused(i, F.linear(h, lw.wqkv, lw.bqkv), t)
            o = F.linear(a.view(1, -1), lw.wo)
            h, x = LigerFusedAddRMSNormFunction.apply(o, x, lw.ln2, w.eps, 0.0, "llama", False)
            m = F.linear(LigerFusedGateUpSiLUMulFunction.apply(F.linear(h, lw.wgu)), lw.wd)
            nxt = w.layers[i + 1].ln1 if i + 1 < len(w.layers) else w.norm
            h, x = LigerFusedAddRMSNormFunction.apply(m, x, nxt, w.eps, 0.0, "llama", False)
        return h

    def _layers_fused_gemv(self, x, t):
        """`_layers_fused` with the GEMV prologues fused: per layer add+RMSNorm+qkv GEMV, kv_update,
        attention (2), o_proj, add+RMSNorm+gate/up GEMV, SwiGLU+down GEMV: 7 launches instead
        of 10. Returns the logits [1, vocab]."""
        from streamkv.backends.gemv_kernels import add_rmsnorm_gemv, gemv, swiglu_gemv

        w = self.w
        x = x.reshape(1, -1)
        limit = self.gemv.max_bytes

        def small(W):
            return limit is None or W.numel() * W.element_size() <= limit

        def norm_gemv(m, x, ln, W, bias=None):  # (W @ rmsnorm(m + x) * ln, m + x); m None: no add
            if small(W):
                return add_rmsnorm_gemv(m if m is not None else x, x if m is not None else None, ln, W, w.eps,
                                        bias, exact=self.gemv.exact)
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            if m is None:
                return F.linear(LigerRMSNormFunction.apply(x, ln, w.eps, 0.0, "llama", False), W, bias), x
            h, x = LigerFusedAddRMSNormFunction.apply(m, x, ln, w.eps, 0.0, "llama", False)
            return F.linear(h, W, bias), x

        def mlp_down(gu, W):
            if small(W):
                return swiglu_gemv(gu, W)
            from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

            return F.linear(LigerFusedGateUpSiLUMulFunction.apply(gu), W)

        m = None  # the previous layer's down-projection output, added to the residual x in the prologue
        for i, lw in enumerate(w.layers):
            qkv, x = norm_gemv(m, x, lw.ln1, lw.wqkv, lw.bqkv)
            a = self._attend_fused(i, qkv, t)
            o = gemv(a.view(1, -1), lw.wo) if small(lw.wo) else F.linear(a.view(1, -1), lw.wo)
            gu, x = norm_gemv(o, x, lw.ln2, lw.wgu)
            m = mlp_down(gu, lw.wd)
        if self.gemv.lm_head and small(w.lm_head):
            logits, _ = add_rmsnorm_gemv(m, x, w.norm, w.lm_head, w.eps, write_residual=False,
                                         exact=self.gemv.exact)
            return logits
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        h, _ = LigerFusedAddRMSNormFunction.apply(m, x, w.norm, w.eps, 0.0, "llama", False)
        return F.linear(h, w.lm_head)

    def _attend_fused(self, i: int, qkv, t, bias=None):
        """Layer i's attention on the fused paths, from its qkv projection (+ `bias`, added by kv_update):
        RoPE of the rotary dims + slot write (Triton kv_update, in the family's q/k/v layout), the scored
        policies' observation, split-KV decode attention. Returns [H, D]."""
        from streamkv.backends.triton_kernels import kv_update

        w = self.w
        kv_update(qkv, self.q_rot, self.k[i], self.v[i], self.side[i] if self.has_side else None,
                  self.cos, self.sin, t, self.qpos, self.write_slot, self.side_write,
                  self.fix_slot if self.n_fix else None, self.fix_src, self.fix_pos,
                  n_heads=w.n_heads, n_kv=w.n_kv_heads, rotate_k=self.rotate_stored, has_side=self.has_side,
                  rotary_dim=w.rotary_ndims, qkv_layout=w.family.qkv_layout, bias=bias)
        if self.scored is not None:  # the Triton attention exposes no probabilities: a torch softmax
            self._observe(i, self.q_rot.view(1, w.n_heads, 1, -1), lambda: self._observed_keys(i))
        return self.attn(self.q_rot, self.k[i], self.v[i], self.valid, self.scale,
                         None if self.rotate_stored else self.cos, None if self.rotate_stored else self.sin)

    def _observe(self, i: int, q, keys) -> None:
        """The scored policy's view of layer i's decode attention; `keys()` gives the rotated slot keys
        (built only when this step scores)."""
        self.scored.record_query(i, q)
        if self.scored.scoring:
            self.scored.observe(i, q, keys(), self.valid)

    def _observed_keys(self, i: int):
        """Layer i's keys as the scored policies observe them: rotated (static: at the slot index)."""
        keys = self.k[i, :, :self.s.capacity]
        if self.rotate_stored:
            return keys
        C = self.s.capacity
        return fn.rope(keys, self.cos[:C], self.sin[:C]).to(keys.dtype)

    def _compact(self) -> None:
        """Static layout, after a prune: move the kept slots to the front (one gather per tensor); the
        permutation is computed from the device keep mask (kept slots first, in cache order), or the
        schedule's when a policy reorders the kept tokens (schedule.py)."""
        if self.scored is not None:
            self._gather(self.scored.compaction(self.valid))
        elif self.perms is None:
            self._gather(kept_first(self.valid[:self.s.capacity]))
        else:
            self._gather(self.perms.index_select(0, self.prune_ctr).view(-1))
        self.prune_ctr.add_(1)

    def _online_prune(self) -> None:
        """Online runs (static layout): apply the compaction the host uploaded (kept slots first, in the
        policy's cache order) and the new valid mask (capturable: reads device buffers only)."""
        self._gather(self.online_perm)
        self.valid[:self.s.capacity].copy_(self.online_valid)

    def _online_decide(self, t: int, n_new: int) -> None:
        """Online runs: after the step (or the prefill) whose last input is text position t, the host
        mirrors the cache, asks the policy (its entropy read, when it makes one, syncs the GPU: the price of
        a data-dependent policy) and applies a prune: bookkeeping, events and visible lengths as
        streamkv.evaluate does."""
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
        self.online_perm.copy_(self._perm_host, non_blocking=True)
        self.online_valid.copy_(self._valid_host, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()
        if self.prune_graph is not None:
            self.prune_graph.replay()
        else:
            self._online_prune()
        s.events.append(decision.event(t, m))

    def _gather(self, perm) -> None:
        C = self.s.capacity
        self.k[:, :, :C] = self.k[:, :, :C].index_select(2, perm)
        self.v[:, :, :C] = self.v[:, :, :C].index_select(2, perm)
        self.valid[:C] = self.valid[:C].index_select(0, perm)

    def _prefill(self, P: int) -> None:
        """The first P tokens in one forward pass (PyTorch ops, not captured), then the prune after it."""
        w, s = self.w, self.s
        dev = self.device
        slots = self.write_slot[:P]
        if self.scored is not None:
            self.scored.begin_prefill(P)
        x = w.embed.index_select(0, self.ids[:P]).unsqueeze(0)
        cos, sin = self.cos[:P], self.sin[:P]
        dense = fn.DenseBlocks(w)
        for i in range(len(w.layers)):
            q, k, v = dense.qkv(i, x)  # [1, H, P, D]
            if self.has_side:
                self.side[i].index_copy_(1, self.side_write[:P], k[0])
            q, k_rot = fn.rope(q, cos, sin).to(q.dtype), fn.rope(k, cos, sin).to(k.dtype)
            self.k[i].index_copy_(1, slots, (k_rot if self.rotate_stored else k)[0])
            self.v[i].index_copy_(1, slots, v[0])
            if self.scored is not None:
                self.scored.observe_prefill(i, q, k_rot, self._observed_keys(i))
            a = fn.attend(q, k_rot, v, self.scale, causal=True, gqa=w.n_kv_heads != w.n_heads)
            x = dense.out(i, x, a.transpose(1, 2).reshape(1, P, -1))
        h = fn.final_norm(x, w)[0]
        for a in range(0, P, 512):  # the head in chunks: [P, vocab] float32 logits would dominate peak memory
            b = min(a + 512, P)
            self.nll[a:b], self.entropy[a:b], self.top1[a:b] = score(fn.lm_head(h[a:b], w), self.ids[a + 1:b + 1],
                                                                        top1=True)
        self.valid[slots] = True
        if self.scored is not None:
            self.scored.end_prefill(P, self.valid)
            if self.compacting and self.scored.plan.prefill_prune:
                self._gather(self.scored.compaction(self.valid))
        if len(s.prefill_evict):
            self.valid[torch.as_tensor(s.prefill_evict, device=dev)] = False
        if s.prefill_perm is not None:
            self._gather(torch.as_tensor(s.prefill_perm, device=dev, dtype=torch.int64))
        self.t.fill_(P)
        if self.online:
            self._online_decide(P - 1, P)

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
                self._compact()
        if self.online:
            self._online_decide(t, 1)

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
        _sync(self.device)

    def run(self, ids: torch.Tensor, prefill: int) -> EvalResult:
        if not self._ensure(ids, prefill):
            return self.eager.run(ids, prefill)
        n, dev, s = len(ids), self.device, self.s
        with torch.inference_mode():
            self._reset_state()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            start = time.perf_counter()
            prefill_ms = 0.0
            if prefill:
                self._prefill(prefill)
                _sync(dev)
                prefill_ms = (time.perf_counter() - start) * 1e3
            prefill_peak = _reset_peak(dev)
            ttft_ms = prefill_ms
            decode_start = time.perf_counter()
            stamps = np.full(n, np.nan)  # stamps[t]: when step t started
            for t in range(prefill, n - 1):
                stamps[t] = time.perf_counter()
                self._replay(t)
                if t == prefill and not prefill:
                    _sync(dev)
                    ttft_ms = (time.perf_counter() - decode_start) * 1e3
            _sync(dev)
            end = time.perf_counter()
            stamps[n - 1] = end
        if dev.type == "cuda":
            decode_peak = torch.cuda.max_memory_allocated(dev) / 2**20
            peak_mb = max(prefill_peak, decode_peak)
        else:
            decode_peak = float("nan")
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ids_np = ids.cpu().numpy()
        return EvalResult(
            index=np.arange(1, n), token_id=ids_np[1:], nll=self.nll[:n - 1].cpu().numpy(),
            entropy=self.entropy[:n - 1].cpu().numpy(), visible_kv=s.visible.copy(), events=list(s.events),
            prefill_ms=prefill_ms, ttft_ms=ttft_ms, decode_ms=(end - decode_start) * 1e3, total_s=end - start,
            peak_mem_mb=peak_mb, decode_peak_mem_mb=decode_peak, prefill_tokens=prefill,
            decode_tokens=n - 1 - prefill, step_ms=step_durations_ms(stamps), top1=self.top1[:n - 1].cpu().numpy(),
            max_position=self._max_position(n))

    def _max_position(self, n: int) -> int:
        """The largest RoPE position of a query in the run's position scheme (as
        CacheManager.query_position): static layout, the query positions the step used (`qpos`, read back
        from the device: online runs write it there); ring layout with StreamingLLM positions, the query
        sits at its true position t and the oldest cached key is rotated at t - visible[t] (schedule.py,
        `required`), so its StreamingLLM position is visible[t]; original positions: the true ones."""
        s = self.s
        if self.layout == "static":
            return int(self.qpos[:n - 1].max())
        if s.position_mode == "shift":
            return int(s.visible[:n - 1].max())
        return int(s.qpos[:n - 1].max())
