"""The `compile` backend: torch.compile (inductor) of each layer's two dense halves.

Each half is one function of tensors (streamkv.backends.functional), so one compiled graph serves
every layer (guards on shapes and dtypes, not on module identity): two compilations per input
length (prefill, then T = 1), no recompiles as the cache fills. Attention and the cache manager
stay eager, so any manager and policy work unchanged. On CUDA inductor emits Triton kernels, on CPU
C++; no CUDA graphs here (the host-driven cache changes shapes every step): that is `cudagraph`.
"""

from __future__ import annotations

import torch

from streamkv.backends.functional import DenseBlocks, ModelWeights, attn_out_mlp, qkv_proj


def compiled_dense(weights: ModelWeights, **compile_kwargs) -> DenseBlocks:
    opts = {"dynamic": False, **compile_kwargs}
    return DenseBlocks(weights, torch.compile(qkv_proj, **opts), torch.compile(attn_out_mlp, **opts))
