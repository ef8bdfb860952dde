"""The graph path's decode-step layers: from the token's embedding to the logits, over the preallocated
slot cache (`SlotCache`), on one kind of kernels that GraphEvaluator (streamkv/backends/graph.py) picks
once per run (`LayerStack`):

  torch       PyTorch ops, SDPA over the valid slots (`cudagraph`; also the un-captured CPU path)
  fused       liger-kernel's RMSNorm (+ residual add) and SwiGLU, our Triton RoPE + cache write (kv_update)
              and split-KV decode attention (streamkv/backends/triton_kernels.py); a LayerNorm family
              (GPT-NeoX) takes streamkv/backends/fused_neox.py's layers instead (`cudagraph_fused`)
  fused_gemv  fused, with each add + RMSNorm folded into the GEMV after it and SwiGLU into the down
              projection (streamkv/backends/gemv_kernels.py; `cudagraph_fused_gemv`, `GemvOptions`)

Everything here reads device tensors only (capturable). Score-based policies (tova, h2o, snapkv,
refresh_select=attention) observe each layer's query and keys through `scored`
(streamkv/backends/scored_eviction.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamkv.backends import functional as fn


@dataclass(frozen=True)
class GemvOptions:
    """cudagraph_fused_gemv (`fused_gemv=True`): replace liger's add + RMSNorm and SwiGLU kernels and the
    cuBLAS GEMV after each by one Triton kernel (streamkv/backends/gemv_kernels.py): 3 launches fewer per
    layer (+ the final norm fused into the LM head). Its own backend name, not a change of cudagraph_fused,
    so that records made with either stay comparable (docs/benchmarks.md has both, measured in one benchmark run)."""

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
    # GPT-NeoX's parallel-residual step: our Triton kernels launched with programmatic dependent launch on
    # sm_90+ (each starts while the one before it drains; streamkv/backends/pdl.py). Same results; False to compare.
    pdl: bool = True


@dataclass
class SlotCache:
    """The preallocated cache and the schedule rows a step reads (device tensors, indexed by the device
    step counter t; streamkv/backends/schedule.py)."""

    k: torch.Tensor  # [L, Hkv, C + 1, D]: C slots + 1 scratch slot (the schedule's padding target)
    v: torch.Tensor
    side: torch.Tensor | None  # ring with sinks/refresh: [L, Hkv, n_side + 1, D] un-rotated keys
    valid: torch.Tensor  # [C + 1] bool
    capacity: int  # C
    rotate_stored: bool  # ring: keys stored rotated at their true positions; static: rotated at read
    cos: torch.Tensor  # float32 RoPE table [max_positions, rotary_ndims]
    sin: torch.Tensor
    write_slot: torch.Tensor  # [n]: the slot step t writes
    qpos: torch.Tensor  # [n]: the query's RoPE position at step t
    side_write: torch.Tensor  # [n]: the side row step t writes
    n_fix: int  # ring: sink/refresh slots re-rotated per step (0: none)
    fix_slot: torch.Tensor  # [n, n_fix]: which slots step t re-rotates, from which side rows, to which positions
    fix_src: torch.Tensor
    fix_pos: torch.Tensor

    @property
    def has_side(self) -> bool:
        return self.side is not None

    def observed_keys(self, i):
        """Layer i's keys [Hkv, C, D] as the scored policies observe them: rotated (static: at the slot
        index); i = slice(None): every layer's, [L, Hkv, C, D]."""
        keys = self.k[i, :, :self.capacity]
        if self.rotate_stored:
            return keys
        C = self.capacity
        return fn.rope(keys, self.cos[:C], self.sin[:C]).to(keys.dtype)


class LayerStack:
    """The decode step's layers on one kind of kernels (module docstring): `stack(x, t, ws)` maps the
    token's embedding x [1, 1, hidden] at device step t (write slot ws) to the logits [1, vocab]."""

    def __init__(self, w, slots: SlotCache, scale: float, scored=None, kind: str = "torch",
                 gemv: GemvOptions = GemvOptions()):
        self.w, self.c, self.scale, self.scored, self.gemv = w, slots, scale, scored, gemv
        if kind != "torch":
            from streamkv.backends.triton_kernels import DecodeAttention

            k = slots.k
            self.attn = DecodeAttention(w.n_heads, w.n_kv_heads, w.head_dim, slots.capacity, k.device, k.dtype,
                                        rotate_k=not slots.rotate_stored, rotary_dim=slots.cos.shape[-1])
            self.q_rot = torch.empty(w.n_heads, w.head_dim, device=k.device, dtype=k.dtype)
            if scored is not None and scored.window:  # kv_update writes each layer's query into its ring stage
                scored.staged = True
        if kind != "torch" and w.family.norm == "layer":  # GPT-NeoX: LayerNorm + GELU kernels (fused_neox.py)
            kind += "_neox"
        self.forward = {"torch": self._torch, "fused": self._fused, "fused_neox": self._fused_neox,
                        "fused_gemv": self._fused_gemv, "fused_gemv_neox": self._fused_gemv_neox}[kind]

    def __call__(self, x, t, ws):
        return self.forward(x, t, ws)

    # ------------------------------------------------------------------ PyTorch ops

    def _torch(self, x, t, ws):
        w, c = self.w, self.c
        C = c.capacity
        pos = c.qpos.index_select(0, t)
        cos, sin = c.cos.index_select(0, pos), c.sin.index_select(0, pos)  # [1, rotary_ndims]
        if c.has_side:
            sw = c.side_write.index_select(0, t)
        if c.n_fix:
            fix_slot = c.fix_slot.index_select(0, t).view(-1)
            fix_src = c.fix_src.index_select(0, t).view(-1)
            fpos = c.fix_pos.index_select(0, t).view(-1)
            fcos, fsin = c.cos.index_select(0, fpos), c.sin.index_select(0, fpos)
        mask = c.valid[:C].view(1, 1, 1, C)
        G = w.n_heads // w.n_kv_heads
        dense = fn.DenseBlocks(w)  # one code path for every family: what differs is data (w.family)
        for i in range(len(w.layers)):
            q, k, v = dense.qkv(i, x)  # [1, H, 1, D], un-rotated
            if c.has_side:
                c.side[i].index_copy_(1, sw, k[0])
            q = fn.rope(q, cos, sin).to(q.dtype)
            if c.rotate_stored:
                k = fn.rope(k, cos, sin).to(k.dtype)
            c.k[i].index_copy_(1, ws, k[0])
            c.v[i].index_copy_(1, ws, v[0])
            if c.n_fix:
                fixed = fn.rope(c.side[i].index_select(1, fix_src), fcos, fsin).to(c.k.dtype)
                c.k[i].index_copy_(1, fix_slot, fixed)
            keys = c.k[i, :, :C]
            if not c.rotate_stored:  # static: StreamingLLM positions = slot index
                keys = fn.rope(keys, c.cos[:C], c.sin[:C]).to(keys.dtype)
            if self.scored is not None:
                self._observe(i, q, lambda layer: keys if layer == i else c.observed_keys(layer))
            qg = q.reshape(1, w.n_kv_heads, G, w.head_dim)  # GQA: a KV head's query heads as rows
            a = fn.attend(qg, keys.unsqueeze(0), c.v[i, :, :C].unsqueeze(0), self.scale, mask=mask)
            x = dense.out(i, x, a.reshape(1, 1, -1))
        return fn.lm_head(fn.final_norm(x, w).view(1, -1), w)

    # ------------------------------------------------------------------ liger + Triton

    def _fused(self, x, t, ws):
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

        w = self.w
        x = x.view(1, -1)
        h = LigerRMSNormFunction.apply(x, w.layers[0].ln1, w.eps, 0.0, "llama", False)
        for i, lw in enumerate(w.layers):
            a = self.attend_fused(i, F.linear(h, lw.wqkv, lw.bqkv), t)
            o = F.linear(a.view(1, -1), lw.wo)
            h, x = LigerFusedAddRMSNormFunction.apply(o, x, lw.ln2, w.eps, 0.0, "llama", False)
            m = F.linear(LigerFusedGateUpSiLUMulFunction.apply(F.linear(h, lw.wgu)), lw.wd)
            nxt = w.layers[i + 1].ln1 if i + 1 < len(w.layers) else w.norm
            h, x = LigerFusedAddRMSNormFunction.apply(m, x, nxt, w.eps, 0.0, "llama", False)
        return fn.lm_head(h.view(1, -1), w)

    def _fused_neox(self, x, t, ws):
        from streamkv.backends.fused_neox import neox_layers_fused

        return fn.lm_head(neox_layers_fused(self, x, t).view(1, -1), self.w)

    def _fused_gemv_neox(self, x, t, ws):
        from streamkv.backends.fused_neox import neox_layers_fused_gemv

        return neox_layers_fused_gemv(self, x, t)

    def _fused_gemv(self, x, t, ws):
        """`_fused` with the GEMV prologues fused: per layer add+RMSNorm+qkv GEMV, kv_update, attention (2),
        o_proj, add+RMSNorm+gate/up GEMV, SwiGLU+down GEMV: 7 launches instead of 10."""
        from streamkv.backends.gemv_kernels import add_rmsnorm_gemv, gemv, swiglu_gemv

        w = self.w
        x = x.reshape(1, -1)
        limit, exact = self.gemv.max_bytes, self.gemv.exact

        def small(W):
            return limit is None or W.numel() * W.element_size() <= limit

        def norm_gemv(m, x, ln, W, bias=None):  # (W @ rmsnorm(m + x) * ln, m + x); m None: no add
            if small(W):
                return add_rmsnorm_gemv(m if m is not None else x, x if m is not None else None, ln, W, w.eps,
                                        bias, exact=exact)
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
            a = self.attend_fused(i, qkv, t)
            o = gemv(a.view(1, -1), lw.wo) if small(lw.wo) else F.linear(a.view(1, -1), lw.wo)
            gu, x = norm_gemv(o, x, lw.ln2, lw.wgu)
            m = mlp_down(gu, lw.wd)
        if self.gemv.lm_head and small(w.lm_head):
            logits, _ = add_rmsnorm_gemv(m, x, w.norm, w.lm_head, w.eps, write_residual=False, exact=exact)
            return logits
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        h, _ = LigerFusedAddRMSNormFunction.apply(m, x, w.norm, w.eps, 0.0, "llama", False)
        return F.linear(h, w.lm_head)

    # ------------------------------------------------------------------ attention (fused paths)

    def attend_fused(self, i: int, qkv, t, bias=None, pdl: bool = False, head_blocks: int = 1):
        """Layer i's attention on the fused paths, from its qkv projection (+ `bias`, added by kv_update):
        RoPE of the rotary dims + slot write (Triton kv_update, in the family's q/k/v layout, in `head_blocks`
        programs per token), the scored policies' observation, split-KV decode attention. Returns [H, D]."""
        from streamkv.backends.triton_kernels import kv_update

        w, c = self.w, self.c
        q_rot = self.scored.qstage[i] if self.scored is not None and self.scored.staged else self.q_rot
        kv_update(qkv, q_rot, c.k[i], c.v[i], c.side[i] if c.has_side else None,
                  c.cos, c.sin, t, c.qpos, c.write_slot, c.side_write,
                  c.fix_slot if c.n_fix else None, c.fix_src, c.fix_pos,
                  n_heads=w.n_heads, n_kv=w.n_kv_heads, rotate_k=c.rotate_stored, has_side=c.has_side,
                  rotary_dim=w.rotary_ndims, qkv_layout=w.family.qkv_layout, bias=bias,
                  head_blocks=head_blocks, pdl=pdl)
        if self.scored is not None:  # the Triton attention exposes no probabilities: a torch softmax
            self._observe(i, q_rot.view(1, w.n_heads, 1, -1), c.observed_keys)
        return self.attn(q_rot, c.k[i], c.v[i], c.valid, self.scale,
                         None if c.rotate_stored else c.cos, None if c.rotate_stored else c.sin, pdl=pdl)

    def _observe(self, i: int, q, keys) -> None:
        """The scored policy's view of layer i's decode attention; `keys(layer)` gives a layer's rotated slot
        keys (`slice(None)`: all layers), built only when this step scores."""
        self.scored.record_query(i, q)
        if self.scored.scoring:
            self.scored.observe(i, q, keys, self.c.valid)
