"""Backends run the decode step; they never change what is computed (same NLL within a stated tolerance,
docs/benchmarks.md). One name per backend (conf/backend/<name>.yaml):

  eager            PyTorch eager over the HF modules; the cache manager and the policy run on the host.
  compile          as eager, with each layer's dense halves (norm + q/k/v projection; o_proj + residual
                   + norm + MLP + residual) compiled by torch.compile (inductor): fewer, fused kernels.
                   Any cache manager, CPU or CUDA. Attention and the cache stay eager (their shapes
                   change as the cache fills; compiling them would recompile).
  fused            as eager, with liger-kernel's fused RMSNorm, fused residual-add + RMSNorm and fused
                   SwiGLU in the dense halves. CUDA only.
  cudagraph        the whole decode step (cache write, sink re-rotation, attention, scoring, the
                   policy's eviction) on preallocated slot buffers, captured once as a CUDA graph and
                   replayed per token; the policy's decisions are precomputed on the host as a slot
                   schedule (streamkv/backends/schedule.py). Needs cache=ring or cache=static and CUDA;
                   `backend.capture=false` runs the same step un-captured, on any device (CPU included).
  cudagraph_fused  cudagraph + liger-kernel (RMSNorm, residual-add + RMSNorm, SwiGLU) + our Triton kernels
                   (RoPE fused with the slot write; split-KV masked decode attention).
  cudagraph_fused_gemv  cudagraph_fused with each residual-add + RMSNorm fused into the GEMV after it and
                   SwiGLU into the down projection (our Triton GEMVs, streamkv/backends/gemv_kernels.py,
                   tuned for SmolLM2-sized weights; weights above 4 MiB keep cuBLAS). Fastest path on
                   small models (docs/benchmarks.md).

The score-based policies tova, h2o and snapkv run inside the graph step (prefill included): with their
original positions (policy.positions=original) in cache=ring, with StreamingLLM positions
(policy.positions=shift) in cache=static (the kept slots compacted after each prune by a permutation
computed on the device). When a prune fires and how many tokens it keeps is scheduled on the host, which
tokens stay is a topk over attention scores computed on the device (streamkv.backends.scored_eviction.ScoredEviction).
The other two combinations (original + static, shift + ring) fall back to eager with a warning. The refresh
policy with refresh_select=attention runs inside the graph step too, in cache=ring and cache=static (its region
chosen on the device by the same SnapKV score: streamkv.backends.refresh_graph). Entropy-driven
policies (adaptive mode=entropy, refresh_select=entropy) run *online* in cache=static: the captured step takes
its write slot from the device's valid mask, and the host reads the step's entropy (one sync per token), asks the
policy and, after a prune, replays a small compaction graph (`backend_used` = "<backend> (online)"); in
cache=ring they run on the eager path with a warning (`evaluator.backend_used` says which path ran).
Families (streamkv/backends/families.py): eager, compile and cudagraph run Llama, Mistral, Qwen2, Qwen3
(SmolLM2) and GPT-NeoX (Pythia); the fused kernels cover what families.BACKEND_FAMILIES lists (GPT-NeoX on
cudagraph_fused: the same weights, prefill and attention, its layer stack in streamkv/backends/fused_neox.py).

The registry of these names, their validation (`check_backend`) and the wiring into a run
(`attach_backend`) live in streamkv/backends/registry.py; this package's __init__ imports nothing, so that
the bottom-layer modules here (families.py, functional.py, which the decoder uses) load without the
graph path above them.
"""
