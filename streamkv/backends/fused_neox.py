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
The GEMVs stay with cuBLAS in this step (`cudagraph_fused_gemv`, below, moves them to our Triton GEMVs), and no
liger kernel is needed (it has no LayerNorm with a fused residual add nor an exact GELU). Which GPT-NeoX models
this step takes (exact GELU) is checked when the weights are gathered (families.check_backend_model).

`cudagraph_fused_gemv` (`neox_layers_fused_gemv`) runs every GEMV but embed_out on our Triton kernels
(streamkv/backends/gemv_kernels.py). With the parallel residual, per layer 7 launches:

  add_layer_norm   the previous layer's residual adds + ln1 + ln2, as above
  gemv_pair        query_key_value of ln1(x) and dense_h_to_4h of ln2(x) + bias + exact GELU: one launch (the
                   two weights stay where they are; the first programs do one GEMV, the rest the other)
  kv_update, attention (2 launches), dense   on the branch stream, as above (dense on our GEMV; kv_update one
                   program per KV head)
  dense_4h_to_h    our GEMV, beside the attention (its bias goes into the next add_layer_norm)

With the sequential residual (10 launches) dense and dense_4h_to_h carry the bias and the residual add in their
epilogue (`gemv(..., adds=)`), query_key_value and dense_h_to_4h stay on cuBLAS, and the final LayerNorm is
embed_out's prologue (`layer_norm_gemv`).

On sm_90+ our Triton kernels in the parallel-residual layers of this step (in the paired step every kernel is
ours) and embed_out on our GEMV are launched with programmatic dependent launch (streamkv/backends/pdl.py,
`GemvOptions.pdl`): each kernel starts while the one before it on its stream drains. cuBLAS GEMVs (weights over
the size limit) and the sequential residual's step run without it.

Measured on H200s (docs/benchmarks.md), Pythia-2.8B's shape, ring, R = 32: the paired step with PDL, kv_update
per KV head, add_layer_norm loading its weights first (at 16 warps), dense_4h_to_h at (2, 256, 4) and the
attention's head dim in two tiles 1.781-1.787 ms/token (1.801-1.817 with add_layer_norm at 8 warps,
dense_4h_to_h at (4, 256, 8) and one padded tile; earlier forms in earlier batches: 1.864 with the norm's
weights loaded after its stores, 1.892 with one kv_update program for all heads); with one program 1.882 with
PDL, 1.993 without; before PDL in other batches: 1.999 (2.068 at the single-GEMV launch configs, 2.186 for the
previous step: the attention beside dense_h_to_4h on cuBLAS, the residual adds in dense_4h_to_h's epilogue); with
dense and dense_4h_to_h on cuBLAS 2.180, with bias + GELU as its own launch 2.249, on one stream 2.459.

Before the paired GEMV, the GEMV step without the two branches measured 2.405 vs 2.598 ms/token for
cudagraph_fused. The LayerNorm as the prologue of query_key_value and dense_h_to_4h too (7 launches per layer) ran
at 2.605: inside the captured step our GEMV with a norm prologue (x, gamma and beta loaded with every weight
tile) is slower than cuBLAS + one norm kernel by more than the launches saved. Weights above
`GemvOptions.max_bytes` keep cuBLAS; when every layer's dense and dense_4h_to_h are over it (Pythia-2.8B at the
default 4 MiB; `backend.gemv_max_mb=0` lifts the limit, as the bench's `--gemv-max-mb 0`) the step is
cudagraph_fused's.

The attention is the fused LayerStack's (`attend_fused`: kv_update in the family's q/k/v layout and
rotary dims, the score-based policies' observation, decode attention), so every policy the graph path
runs for the Llama family runs here too: the scheduled ones, tova / h2o / snapkv, and the entropy-driven
ones online (tests/test_fused_neox.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from streamkv.timing import kept_stream


# ---------------------------------------------------------------- the parallel residual's two branches

def branch_stream(device):
    """The stream the attention branch runs on beside the MLP (kept per device: streamkv.timing.kept_stream).
    High priority, so that its short, dependent kernels (qkv, kv_update, the two attention launches, dense) get
    SMs first as the MLP's GEMV blocks retire; measured, the priority's effect is within the spread between
    runs (docs/benchmarks.md). None on the CPU, where the branches run one after the other."""
    if device.type != "cuda":
        return None
    return kept_stream(device, "branch", priority=-1)


@contextmanager
def beside(side):
    """Work issued inside runs on `side`, after everything issued so far on the current stream (a fork that
    CUDA-graph capture records as a parallel branch); `join(side)` orders it back. None: the current stream."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def join(side) -> None:
    """The current stream waits for everything issued on `side` (the end of the branch)."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


# ---------------------------------------------------------------- the decode step's layers (capturable)


def neox_layers_fused(stack, x, t, ours=None, pdl: bool = False):
    """The decode step's layers and final norm for GPT-NeoX, from the token's embedding x [1, 1, hidden]:
    returns the final LayerNorm's output [1, hidden] (the caller applies embed_out). `stack`: the fused
    LayerStack (its weights `w` and `attend_fused`). `ours(W)`: whether weight W runs on our Triton GEMV
    (`cudagraph_fused_gemv`, parallel residual); None: cuBLAS throughout (`cudagraph_fused`). With both
    query_key_value and dense_h_to_4h on ours they are one `gemv_pair` launch before the fork. `pdl`: our kernels
    with programmatic dependent launch (streamkv/backends/pdl.py; the caller checks the device)."""
    from streamkv.backends.gemv_kernels import gemv, gemv_pair
    from streamkv.backends.triton_kernels import add_layer_norm, bias_gelu

    w = stack.w

    def linear(a, W):
        return gemv(a, W, pdl=pdl) if ours is not None and ours(W) else F.linear(a, W)

    x = x.reshape(1, -1)
    pending = None  # the previous layer's outputs (with their biases) not yet added to the residual x
    fam = w.family
    side = branch_stream(x.device) if fam.parallel_residual else None
    head_blocks = w.n_kv_heads if ours is not None else 1  # kv_update per KV head in the GEMV step
    for i, lw in enumerate(w.layers):
        ln2 = (lw.ln2, lw.ln2_b) if fam.parallel_residual else None
        x, h1, h2 = add_layer_norm(x, pending, (lw.ln1, lw.ln1_b), ln2, w.eps, pdl=pdl)
        paired = ours is not None and fam.parallel_residual and ours(lw.wqkv) and ours(lw.wgu)
        if paired:  # query_key_value and dense_h_to_4h + bias + GELU: one launch
            qkv, act = gemv_pair(h1, lw.wqkv, h2, lw.wgu, lw.bgu, gelu2=True, pdl=pdl)
        with beside(side):  # parallel residual: the attention on the branch stream, the MLP beside it
            a = stack.attend_fused(i, qkv if paired else F.linear(h1, lw.wqkv), t, bias=lw.bqkv,  # + qkv bias
                                   pdl=pdl, head_blocks=head_blocks)
            o = linear(a.view(1, -1), lw.wo)
        if not fam.parallel_residual:  # ln2 norms x + attention
            x, h2, _ = add_layer_norm(x, [(o, lw.bo)], (lw.ln2, lw.ln2_b), None, w.eps)
        m = linear(act if paired else bias_gelu(F.linear(h2, lw.wgu), lw.bgu), lw.wd)
        join(side)
        pending = [(o, lw.bo), (m, lw.bd)] if fam.parallel_residual else [(m, lw.bd)]
    _, h, _ = add_layer_norm(x, pending, (w.norm, w.norm_b), None, w.eps, write_x=False, pdl=pdl)
    return h


def neox_layers_fused_gemv(stack, x, t):
    """`cudagraph_fused_gemv`'s GPT-NeoX step (module docstring): from the token's embedding x [1, 1, hidden] to
    the logits [1, vocab]."""
    from streamkv.backends.gemv_kernels import gemv, layer_norm_gemv
    from streamkv.backends.pdl import pdl_supported
    from streamkv.backends.triton_kernels import add_layer_norm, bias_gelu

    w = stack.w
    limit = stack.gemv.max_bytes

    def small(W):
        return limit is None or W.numel() * W.element_size() <= limit

    if not any(small(W) for lw in w.layers for W in (lw.wo, lw.wd)):
        # both GEMVs of every layer over the size limit: cudagraph_fused's step (fewer launches than the fallback)
        return F.linear(neox_layers_fused(stack, x, t).view(1, -1), w.lm_head, w.lm_head_b)

    def gemv_add(a, W, bias, adds):  # W @ a + bias + sum(adds): the residual adds in our GEMV's epilogue
        if small(W):
            return gemv(a, W, bias, adds=adds)
        return sum(adds, F.linear(a, W, bias))

    if w.family.parallel_residual:  # cudagraph_fused's layers with our GEMVs; embed_out on ours too if small
        pdl = stack.gemv.pdl and pdl_supported(x.device)  # Hopper or newer
        h = neox_layers_fused(stack, x, t, ours=small, pdl=pdl)
        return gemv(h, w.lm_head, w.lm_head_b, pdl=pdl) if stack.gemv.lm_head and small(w.lm_head) else \
            F.linear(h, w.lm_head, w.lm_head_b)
    x = x.reshape(1, -1)
    for i, lw in enumerate(w.layers):  # x1 = x + attention(ln1(x)); x1 + mlp(ln2(x1))
        _, h1, _ = add_layer_norm(x, None, (lw.ln1, lw.ln1_b), None, w.eps, write_x=False)
        a = stack.attend_fused(i, F.linear(h1, lw.wqkv), t, bias=lw.bqkv).view(1, -1)  # + the qkv bias
        x = gemv_add(a, lw.wo, lw.bo, (x,))
        _, h2, _ = add_layer_norm(x, None, (lw.ln2, lw.ln2_b), None, w.eps, write_x=False)
        x = gemv_add(bias_gelu(F.linear(h2, lw.wgu), lw.bgu), lw.wd, lw.bd, (x,))
    if stack.gemv.lm_head and small(w.lm_head):
        return layer_norm_gemv(x, w.norm, w.norm_b, w.lm_head, w.eps, w.lm_head_b)
    _, h, _ = add_layer_norm(x, None, (w.norm, w.norm_b), None, w.eps, write_x=False)
    return F.linear(h, w.lm_head, w.lm_head_b)

