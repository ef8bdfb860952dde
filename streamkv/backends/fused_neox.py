"""GPT-NeoX (Pythia) on the graph path with our Triton kernels (`cudagraph_fused`).

GraphEvaluator (streamkv/backends/graph.py) owns the slot cache, the schedule and the capture; for a
GPT-NeoX model it takes its weights from `neox_weights`, runs the prefill with `neox_prefill` and the
decode step's layers with `neox_layers_fused`. Per layer, 9 launches:

  add_layer_norm   the previous layer's residual adds (its output biases included) + ln1 (+ ln2 of the
                   same sum with the parallel residual): one Triton kernel
  query_key_value  cuBLAS GEMV, no bias (the bias is added inside kv_update)
  kv_update        qkv bias + partial RoPE (first rotary_ndims dims) + slot write + sink re-rotation,
                   reading the per-head [q k v] layout in place (no weight permuted or copied)
  attention        split-KV decode attention (2 launches), scores in float32
  dense            cuBLAS GEMV (its bias goes into the next add_layer_norm)
  dense_h_to_4h    cuBLAS GEMV, then bias + exact GELU (one Triton kernel)
  dense_4h_to_h    cuBLAS GEMV (its bias goes into the next add_layer_norm)

With the sequential residual (use_parallel_residual=False) ln2 needs the attention's sum first: one
add_layer_norm more per layer. The final add + final_layer_norm is one more; embed_out is a GEMV.
The big GEMVs stay with cuBLAS (bandwidth-bound: cuBLAS beats our Triton GEMVs above ~10 MB of
weights, streamkv/backends/gemv_kernels.py), and no liger kernel is needed (it has no LayerNorm with
a fused residual add nor an exact GELU).

`neox_weights` reads the HF modules' parameters directly (nothing copied): a local adapter until the
family-neutral weight container replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class NeoXLayer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    wqkv: torch.Tensor  # [3 H D, hidden], rows per head [q | k | v] (HF's query_key_value)
    bqkv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]
    w_up: torch.Tensor  # dense_h_to_4h
    b_up: Optional[torch.Tensor]
    w_down: torch.Tensor  # dense_4h_to_h
    b_down: Optional[torch.Tensor]
    act: Callable  # HF's activation module (the torch prefill)


@dataclass
class NeoXWeights:
    """The attributes GraphEvaluator reads from any family's weights (embed, layers, lm_head, n_heads,
    n_kv_heads, head_dim) plus GPT-NeoX's own."""

    embed: torch.Tensor
    layers: list
    norm_w: torch.Tensor
    norm_b: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_ndims: int
    parallel_residual: bool
    exact_gelu: bool  # hidden_act == "gelu" (erf): the fused path's GELU kernel
    family: str = "neox"
    qkv_layout: str = "per_head"
    lm_head_b: Optional[torch.Tensor] = None  # read by the shared LM head (functional.lm_head): Pythia has none


def is_neox(hf_model) -> bool:
    return hf_model.config.model_type == "gpt_neox"


@torch.no_grad()
def neox_weights(hf_model) -> NeoXWeights:
    cfg, base = hf_model.config, hf_model.gpt_neox
    layers = []
    for layer in base.layers:
        att, mlp = layer.attention, layer.mlp
        layers.append(NeoXLayer(
            ln1_w=layer.input_layernorm.weight, ln1_b=layer.input_layernorm.bias,
            ln2_w=layer.post_attention_layernorm.weight, ln2_b=layer.post_attention_layernorm.bias,
            wqkv=att.query_key_value.weight, bqkv=att.query_key_value.bias, wo=att.dense.weight, bo=att.dense.bias,
            w_up=mlp.dense_h_to_4h.weight, b_up=mlp.dense_h_to_4h.bias, w_down=mlp.dense_4h_to_h.weight,
            b_down=mlp.dense_4h_to_h.bias, act=mlp.act))
    att0 = base.layers[0].attention
    n_heads = cfg.num_attention_heads
    return NeoXWeights(
        embed=base.embed_in.weight, layers=layers, norm_w=base.final_layer_norm.weight,
        norm_b=base.final_layer_norm.bias, lm_head=hf_model.get_output_embeddings().weight,
        eps=float(cfg.layer_norm_eps), n_heads=n_heads, n_kv_heads=n_heads, head_dim=att0.head_size,
        rotary_ndims=att0.rotary_ndims, parallel_residual=bool(cfg.use_parallel_residual),
        exact_gelu=cfg.hidden_act == "gelu")


def check_neox_fused(w: NeoXWeights, backend: str) -> None:
    if not w.exact_gelu:
        raise NotImplementedError(f"backend: '{backend}' fuses GPT-NeoX's exact (erf) GELU only; use "
                                  f"backend=eager")


def _check_policy(ev) -> None:
    if ev.scored is not None or ev.online:
        raise NotImplementedError("GPT-NeoX on the graph path runs the scheduled policies (streaming, max_drop, "
                                  "overlap, refresh, adaptive slack); score-based and entropy-driven ones: "
                                  "backend=eager")


def rope_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] with its first cos.shape[-1] dims rotated by cos/sin [T, R] (rotate_half within them),
    the rest passed through (HF's GPT-NeoX apply_rotary_pos_emb)."""
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    half = R // 2
    out = (rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


# ---------------------------------------------------------------- the prefill (PyTorch ops, not captured)


def neox_prefill(ev, P: int) -> None:
    """GraphEvaluator._prefill for GPT-NeoX: the first P tokens in one forward pass (HF's arithmetic),
    their K/V into the slots (ring: rotated + the un-rotated side copy; static: raw), their NLL and
    entropy, then the prefill's scheduled eviction."""
    from streamkv.backends.functional import score

    _check_policy(ev)
    w, s, dev = ev.w, ev.s, ev.device
    H, D = w.n_heads, w.head_dim
    slots = ev.write_slot[:P]
    x = w.embed.index_select(0, ev.ids[:P]).unsqueeze(0)
    cos, sin = ev.cos[:P], ev.sin[:P]
    hidden = x.shape[-1]
    for i, lw in enumerate(w.layers):
        h = F.layer_norm(x, (hidden,), lw.ln1_w, lw.ln1_b, w.eps)
        qkv = F.linear(h, lw.wqkv, lw.bqkv).view(1, P, H, 3 * D).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # [1, H, P, D] each, un-rotated
        if ev.has_side:
            ev.side[i].index_copy_(1, ev.side_write[:P], k[0])
        q, k_rot = rope_partial(q, cos, sin), rope_partial(k, cos, sin)
        ev.k[i].index_copy_(1, slots, (k_rot if ev.rotate_stored else k)[0])
        ev.v[i].index_copy_(1, slots, v[0])
        a = F.scaled_dot_product_attention(q, k_rot, v, is_causal=True, scale=ev.scale)
        o = F.linear(a.transpose(1, 2).reshape(1, P, -1), lw.wo, lw.bo)
        if w.parallel_residual:
            m = _mlp(lw, F.layer_norm(x, (hidden,), lw.ln2_w, lw.ln2_b, w.eps))
            x = m + o + x  # HF's order of the parallel residual's adds
        else:
            x = o + x
            x = _mlp(lw, F.layer_norm(x, (hidden,), lw.ln2_w, lw.ln2_b, w.eps)) + x
    h = F.layer_norm(x, (hidden,), w.norm_w, w.norm_b, w.eps)[0]
    for a in range(0, P, 512):  # the head in chunks: [P, vocab] float32 logits would dominate peak memory
        b = min(a + 512, P)
        ev.nll[a:b], ev.entropy[a:b] = score(F.linear(h[a:b], w.lm_head), ev.ids[a + 1:b + 1])
    ev.valid[slots] = True
    if len(s.prefill_evict):
        ev.valid[torch.as_tensor(s.prefill_evict, device=dev)] = False
    if s.prefill_perm is not None:
        ev._gather(torch.as_tensor(s.prefill_perm, device=dev, dtype=torch.int64))
    ev.t.fill_(P)


def _mlp(lw: NeoXLayer, h):
    return F.linear(lw.act(F.linear(h, lw.w_up, lw.b_up)), lw.w_down, lw.b_down)


# ---------------------------------------------------------------- the decode step's layers (capturable)


def neox_layers_fused(ev, x, t):
    """The decode step's layers and final norm for GPT-NeoX, from the token's embedding x [1, 1, hidden]:
    returns the final LayerNorm's output [1, hidden] (the caller applies embed_out)."""
    from streamkv.backends.triton_kernels import add_layer_norm, bias_gelu

    _check_policy(ev)
    w = ev.w
    x = x.reshape(1, -1)
    pending = None  # the previous layer's outputs (with their biases) not yet added to the residual x
    for i, lw in enumerate(w.layers):
        ln2 = (lw.ln2_w, lw.ln2_b) if w.parallel_residual else None
        x, h1, h2 = add_layer_norm(x, pending, (lw.ln1_w, lw.ln1_b), ln2, w.eps)
        a = _attend(ev, i, F.linear(h1, lw.wqkv), lw.bqkv, t)
        o = F.linear(a.view(1, -1), lw.wo)
        if not w.parallel_residual:  # ln2 norms x + attention
            x, h2, _ = add_layer_norm(x, [(o, lw.bo)], (lw.ln2_w, lw.ln2_b), None, w.eps)
        m = F.linear(bias_gelu(F.linear(h2, lw.w_up), lw.b_up), lw.w_down)
        pending = [(o, lw.bo), (m, lw.b_down)] if w.parallel_residual else [(m, lw.b_down)]
    _, h, _ = add_layer_norm(x, pending, (w.norm_w, w.norm_b), None, w.eps, write_x=False)
    return h


def _attend(ev, i: int, qkv, bias, t):
    """Layer i's attention from its raw qkv GEMV output [1, 3 H D]: kv_update (bias, partial RoPE, slot
    write, fix slots) then split-KV decode attention. Returns [H, D]."""
    from streamkv.backends.triton_kernels import kv_update

    w = ev.w
    kv_update(qkv, ev.q_rot, ev.k[i], ev.v[i], ev.side[i] if ev.has_side else None,
              ev.cos, ev.sin, t, ev.qpos, ev.write_slot, ev.side_write,
              ev.fix_slot if ev.n_fix else None, ev.fix_src, ev.fix_pos,
              n_heads=w.n_heads, n_kv=w.n_kv_heads, rotate_k=ev.rotate_stored, has_side=ev.has_side,
              rotary_dim=w.rotary_ndims, qkv_layout=w.qkv_layout, bias=bias)
    return ev.attn(ev.q_rot, ev.k[i], ev.v[i], ev.valid, ev.scale,
                   None if ev.rotate_stored else ev.cos, None if ev.rotate_stored else ev.sin)
