"""GPT-NeoX (Pythia) on the graph path with our Triton kernels (`cudagraph_fused`): the decode step's layers.

GraphEvaluator (streamkv/backends/graph.py) owns the weights (the family-neutral ModelWeights of
streamkv/backends/families.py, as for every family), the slot cache, the schedule, the prefill (one
family-neutral code path) and the capture; its fused LayerStack (streamkv/backends/graph_layers.py) hands
the step's layers to `neox_layers_fused` for a LayerNorm family (`w.family.norm == "layer"`: GPT-NeoX).
Per layer, 9 launches:

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
add_layer_norm more per layer. The final add + final_layer_norm is one more; embed_out is a GEMV
(functional.lm_head, shared with every family).
The big GEMVs stay with cuBLAS (bandwidth-bound: cuBLAS beats our Triton GEMVs above ~10 MB of
weights, streamkv/backends/gemv_kernels.py), and no liger kernel is needed (it has no LayerNorm with
a fused residual add nor an exact GELU). Which GPT-NeoX models this step takes (exact GELU) is checked
when the weights are gathered (families.check_backend_model).

`cudagraph_fused_gemv` (`neox_layers_fused_gemv`) folds the small kernels into our Triton GEMVs
(streamkv/backends/gemv_kernels.py): each LayerNorm into the GEMV after it (prologue), the h_to_4h bias +
GELU and the residual adds into the GEMV before them (epilogue, on the N outputs only). Per layer, 7
launches with either residual:

  query_key_value  LayerNorm(x; ln1) prologue, no bias (kv_update adds it)
  kv_update, attention (2 launches) as above
  dense            + bias (parallel residual); sequential: + bias + x, i.e. the residual after attention
  dense_h_to_4h    LayerNorm(x; ln2) prologue, + bias, exact GELU epilogue
  dense_4h_to_h    + bias + the dense output + x (parallel) or + x (sequential): the next residual x

and the final LayerNorm is embed_out's prologue. Weights above `GemvOptions.max_bytes` keep the unfused
kernels (add_layer_norm / cuBLAS / bias_gelu) for that GEMV; when every layer GEMV is over it (Pythia-2.8B
at the default 4 MiB) the step is cudagraph_fused's. Measured on an H200 with every GEMV on our kernels
(docs/benchmarks.md): on par with cudagraph_fused (2.610 vs 2.592 ms/token): the 97 launches fewer per
token are paid back by our GEMVs running ~15 % below cuBLAS's bandwidth inside the captured step.

The attention is the fused LayerStack's (`attend_fused`: kv_update in the family's q/k/v layout and
rotary dims, the score-based policies' observation, decode attention), so every policy the graph path
runs for the Llama family runs here too: the scheduled ones, tova / h2o / snapkv, and the entropy-driven
ones online (tests/test_fused_neox.py).
"""

from __future__ import annotations

import torch.nn.functional as F


# ---------------------------------------------------------------- the decode step's layers (capturable)


def neox_layers_fused(stack, x, t):
    """The decode step's layers and final norm for GPT-NeoX, from the token's embedding x [1, 1, hidden]:
    returns the final LayerNorm's output [1, hidden] (the caller applies embed_out). `stack`: the fused
    LayerStack (its weights `w` and `attend_fused`)."""
    from streamkv.backends.triton_kernels import add_layer_norm, bias_gelu

    w = stack.w
    x = x.reshape(1, -1)
    pending = None  # the previous layer's outputs (with their biases) not yet added to the residual x
    fam = w.family
    for i, lw in enumerate(w.layers):
        ln2 = (lw.ln2, lw.ln2_b) if fam.parallel_residual else None
        x, h1, h2 = add_layer_norm(x, pending, (lw.ln1, lw.ln1_b), ln2, w.eps)
        a = stack.attend_fused(i, F.linear(h1, lw.wqkv), t, bias=lw.bqkv)  # kv_update adds the qkv bias
        o = F.linear(a.view(1, -1), lw.wo)
        if not fam.parallel_residual:  # ln2 norms x + attention
            x, h2, _ = add_layer_norm(x, [(o, lw.bo)], (lw.ln2, lw.ln2_b), None, w.eps)
        m = F.linear(bias_gelu(F.linear(h2, lw.wgu), lw.bgu), lw.wd)
        pending = [(o, lw.bo), (m, lw.bd)] if fam.parallel_residual else [(m, lw.bd)]
    _, h, _ = add_layer_norm(x, pending, (w.norm, w.norm_b), None, w.eps, write_x=False)
    return h


def neox_layers_fused_gemv(stack, x, t):
    """`neox_layers_fused` on the fused-prologue/epilogue GEMVs (module docstring): from the token's embedding
    x [1, 1, hidden] to the logits [1, vocab]."""
    from streamkv.backends.gemv_kernels import gemv, layer_norm_gemv
    from streamkv.backends.triton_kernels import add_layer_norm, bias_gelu

    w = stack.w
    limit = stack.gemv.max_bytes

    def small(W):
        return limit is None or W.numel() * W.element_size() <= limit

    if not any(small(W) for lw in w.layers for W in (lw.wqkv, lw.wo, lw.wgu, lw.wd)):
        # every layer GEMV over the size limit: cudagraph_fused's step (fewer launches than a fallback per GEMV)
        return F.linear(neox_layers_fused(stack, x, t).view(1, -1), w.lm_head, w.lm_head_b)

    def ln_gemv(x, ln, ln_b, W, bias=None, gelu=False, fuse=True):  # (gelu of) W @ LayerNorm(x) + bias
        if fuse and small(W):
            return layer_norm_gemv(x, ln, ln_b, W, w.eps, bias, gelu=gelu)
        _, h, _ = add_layer_norm(x, None, (ln, ln_b), None, w.eps, write_x=False)
        return bias_gelu(F.linear(h, W), bias) if gelu else F.linear(h, W, bias)

    def gemv_add(a, W, bias, adds):  # W @ a + bias + sum(adds)
        if small(W):
            return gemv(a, W, bias, adds=adds)
        y = F.linear(a, W, bias)
        for r in adds:
            y = y + r
        return y

    x = x.reshape(1, -1)
    for i, lw in enumerate(w.layers):
        a = stack.attend_fused(i, ln_gemv(x, lw.ln1, lw.ln1_b, lw.wqkv), t, bias=lw.bqkv).view(1, -1)
        if w.family.parallel_residual:  # x + attention(ln1(x)) + mlp(ln2(x))
            o = gemv_add(a, lw.wo, lw.bo, ())
            act = ln_gemv(x, lw.ln2, lw.ln2_b, lw.wgu, lw.bgu, gelu=True)
            x = gemv_add(act, lw.wd, lw.bd, (o, x))
        else:  # x1 = x + attention(ln1(x)); x1 + mlp(ln2(x1))
            x = gemv_add(a, lw.wo, lw.bo, (x,))
            x = gemv_add(ln_gemv(x, lw.ln2, lw.ln2_b, lw.wgu, lw.bgu, gelu=True), lw.wd, lw.bd, (x,))
    return ln_gemv(x, w.norm, w.norm_b, w.lm_head, w.lm_head_b, fuse=stack.gemv.lm_head)
