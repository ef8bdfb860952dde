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
"""

from __future__ import annotations

import torch

from streamkv.backends import functional as fn
from streamkv.backends.compile import compiled_dense
from streamkv.backends.fused import fused_dense
from streamkv.backends.graph import GemvOptions, GraphEvaluator
from streamkv.errors import ConfigError

BACKENDS = {
    "eager": "PyTorch eager, host-driven cache manager",
    "compile": "torch.compile (inductor) of the dense halves of each layer, host-driven cache manager",
    "fused": "liger-kernel fused RMSNorm / add+RMSNorm / SwiGLU, host-driven cache manager (CUDA)",
    "cudagraph": "whole decode step captured as one CUDA graph over a slot schedule (CUDA; cache=ring|static)",
    "cudagraph_fused": "cudagraph + liger-kernel + own Triton RoPE/cache-write and decode attention",
    "cudagraph_fused_gemv": "cudagraph_fused + own Triton GEMVs with the norm / SwiGLU fused in",
}
CUDA_ONLY = ("fused", "cudagraph", "cudagraph_fused", "cudagraph_fused_gemv")
GRAPH = ("cudagraph", "cudagraph_fused", "cudagraph_fused_gemv")
PREALLOCATED = ("ring", "static")


def check_backend(cfg) -> None:
    """Raise ConfigError (one line) if cfg.backend cannot run this config. Runs before any model loads."""
    name = cfg.backend.name
    if name not in BACKENDS:
        raise ConfigError(f"backend: '{name}' is not one of {', '.join(BACKENDS)}")
    capture = cfg.backend.get("capture", True)
    if not capture and name not in GRAPH:
        raise ConfigError(f"backend.capture: only the graph backends ({', '.join(GRAPH)}) capture; "
                          f"backend={name} takes no capture=false")
    if name == "eager":
        return
    # the PyTorch graph step runs un-captured on any device (same step, no CUDA graph)
    if name in CUDA_ONLY and not (name == "cudagraph" and not capture):
        dev = str(cfg.device)
        on_cpu = "backend=eager, backend=compile or backend=cudagraph backend.capture=false"
        if dev == "cpu":
            raise ConfigError(f"backend: '{name}' needs a CUDA device (device=cpu); on CPU use {on_cpu}")
        if dev == "auto":
            if not torch.cuda.is_available():
                raise ConfigError(f"backend: '{name}' needs a CUDA device (device=auto finds none here); on CPU "
                                  f"use {on_cpu}")
    if name in GRAPH and cfg.cache.name not in PREALLOCATED:
        raise ConfigError(f"backend: '{name}' needs a preallocated cache manager (cache=ring or cache=static), "
                          f"not cache={cfg.cache.name}")


def attach_backend(cfg, evaluator, tokenizer=None, gemv=None):
    """Wire cfg.backend into an Evaluator built for the run (streamkv.runner.make_evaluator); returns the
    object to call warm_up/run on (the same evaluator, or a GraphEvaluator wrapping it). `gemv`: the
    GemvOptions of cudagraph_fused_gemv (streamkv.backends.graph; None: their defaults)."""
    name = cfg.backend.name
    evaluator.backend_name = evaluator.backend_used = name
    if name == "eager":
        return evaluator
    weights = fn.gather_weights(evaluator.decoder.model, name)
    if name == "compile":
        evaluator.decoder.dense = compiled_dense(weights)
        return evaluator
    if name == "fused":
        evaluator.decoder.dense = fused_dense(weights)
        return evaluator
    return GraphEvaluator(evaluator, layout=cfg.cache.name, tokenizer=tokenizer,
                          capture=bool(cfg.backend.get("capture", True)), gemv=gemv or GemvOptions(),
                          **graph_kernels(name))


def graph_kernels(name: str) -> dict:
    """GraphEvaluator's kernel switches for a graph backend name (also used by streamkv.bench)."""
    return {"fused": name.startswith("cudagraph_fused"), "fused_gemv": name == "cudagraph_fused_gemv"}


__all__ = ["BACKENDS", "attach_backend", "check_backend", "graph_kernels"]
