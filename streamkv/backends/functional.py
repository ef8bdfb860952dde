"""The fast backends' building blocks: the weights gathered once from the HF model (family-neutral,
streamkv/backends/families.py) and one layer's dense work as plain functions of tensors.

`gather_weights` concatenates q/k/v and gate/up weights into one tensor each (one matmul instead of
three or two) and points the HF modules' parameters at views of it, so that nothing is stored twice
and the HF model (eager path, HF baselines) keeps working unchanged. The functions below reproduce
the HF modules' arithmetic for every family (RMSNorm in float32 then cast, or LayerNorm with bias;
SiLU-gated or plain MLP with the HF activation module; sequential or parallel residual in HF's order of
additions; partial rotary), so the eager and fast paths differ only by matmul rounding. What differs
per family is data (`Family`, passed as `fam`), not a code path of its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from streamkv.backends.families import (FAMILIES, Family, LayerWeights, ModelWeights,  # noqa: F401 (re-exported)
                                        _fuse_rows, gather_weights)


# ---------------------------------------------------------------- plain functions (HF arithmetic)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], eps: float, kind: str) -> torch.Tensor:
    """The family's norm: RMSNorm (HF's float32 arithmetic) or LayerNorm with bias (nn.LayerNorm's)."""
    if kind == "rms":
        return rms_norm(x, w, eps)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] rotated by cos/sin [T, r] (the RotaryTable layout: halves duplicated): the first r
    dims of each head rotate (partial rotary, GPT-NeoX: r = rotary_ndims < D), the rest pass through."""
    r = cos.shape[-1]
    rot = x if r == x.shape[-1] else x[..., :r]
    half = r // 2
    out = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:].to(out.dtype)], dim=-1)


def qkv_proj(x, ln1, ln1_b, wqkv, bqkv, q_norm, k_norm, fam: Family, n_heads: int, n_kv: int, head_dim: int):
    """Input norm + fused q/k/v projection: x [B, T, hidden] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]
    (un-rotated). Rows in the family's layout: grouped [all q | all k | all v] or per head [H, (q, k, v), D]
    (GPT-NeoX: split with a view, families.py says why)."""
    B, T, _ = x.shape
    qkv = F.linear(norm(x, ln1, ln1_b, fam.eps, fam.norm), wqkv, bqkv)
    if fam.qkv_layout == "per_head":
        q, k, v = qkv.view(B, T, n_heads, 3, head_dim).unbind(3)
    else:
        q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        q, k, v = q.view(B, T, n_heads, head_dim), k.view(B, T, n_kv, head_dim), v.view(B, T, n_kv, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, fam.eps), rms_norm(k, k_norm, fam.eps)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def mlp(h, wgu, bgu, wd, bd, fam: Family, act):
    u = F.linear(h, wgu, bgu)
    if fam.gated:
        gate, up = u.chunk(2, dim=-1)
        u = act(gate) * up
    else:
        u = act(u)
    return F.linear(u, wd, bd)


def attn_out_mlp(x, attn, wo, bo, ln2, ln2_b, wgu, bgu, wd, bd, fam: Family, act):
    """Output projection, norm + MLP and the residuals: sequential x' = x + o; x' + mlp(norm(x')), or
    parallel (GPT-NeoX) mlp(norm(x)) + o + x, each in HF's order of additions."""
    o = F.linear(attn, wo, bo)
    if fam.parallel_residual:
        return mlp(norm(x, ln2, ln2_b, fam.eps, fam.norm), wgu, bgu, wd, bd, fam, act) + o + x
    x = x + o
    return x + mlp(norm(x, ln2, ln2_b, fam.eps, fam.norm), wgu, bgu, wd, bd, fam, act)


def final_norm(x, w: ModelWeights):
    return norm(x, w.norm, w.norm_b, w.eps, w.family.norm)


def lm_head(h, w: ModelWeights):
    return F.linear(h, w.lm_head, w.lm_head_b)


def attend(q, k, v, scale: float, mask=None, causal: bool = False, gqa: bool = False):
    """Scaled dot-product attention. In float16 the query is scaled before the product (as HF's old
    GPT-NeoX baddbmm with alpha did): the scores a PyTorch path materializes (SDPA's math path) are then
    the softmax inputs themselves, not sqrt(D) times larger, which overflow float16 on GPT-NeoX models.
    SDPA's fused kernels accumulate in float32 anyway; float32 and bfloat16 are unchanged."""
    if q.dtype == torch.float16:
        q, scale = (q.float() * scale).to(q.dtype), 1.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


class DenseBlocks:
    """Decoder.dense for the host-driven path: the two dense halves of a layer, each one function of
    tensors (so one compiled graph serves every layer)."""

    def __init__(self, weights: ModelWeights, qkv_fn=qkv_proj, out_fn=attn_out_mlp):
        self.w, self._qkv, self._out = weights, qkv_fn, out_fn

    def qkv(self, i: int, x):
        lw, w = self.w.layers[i], self.w
        return self._qkv(x, lw.ln1, lw.ln1_b, lw.wqkv, lw.bqkv, lw.q_norm, lw.k_norm, w.family, w.n_heads,
                         w.n_kv_heads, w.head_dim)

    def out(self, i: int, x, attn):
        lw = self.w.layers[i]
        return self._out(x, attn, lw.wo, lw.bo, lw.ln2, lw.ln2_b, lw.wgu, lw.bgu, lw.wd, lw.bd, self.w.family,
                         self.w.act)

