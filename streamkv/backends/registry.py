"""The backends by name (docs in streamkv/backends/__init__.py): their registry, the check of a config
against them before anything loads, and the wiring of the chosen one into an evaluator built for a run."""

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
    mb = cfg.backend.get("gemv_max_mb")
    if mb is not None and name != "cudagraph_fused_gemv":
        raise ConfigError(f"backend.gemv_max_mb: only backend=cudagraph_fused_gemv has fused GEMVs; "
                          f"backend={name} takes none")
    if mb is not None and mb < 0:
        raise ConfigError(f"backend.gemv_max_mb: {mb} is negative (0 = every GEMV fused)")
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
    mb = cfg.backend.get("gemv_max_mb")
    if gemv is None and mb is not None:  # the run config's limit (the bench passes its own options)
        gemv = GemvOptions(max_bytes=None if mb == 0 else int(mb * 2**20))
    return GraphEvaluator(evaluator, layout=cfg.cache.name, tokenizer=tokenizer,
                          capture=bool(cfg.backend.get("capture", True)), gemv=gemv or GemvOptions(),
                          **graph_kernels(name))


def graph_kernels(name: str) -> dict:
    """GraphEvaluator's kernel switches for a graph backend name (also used by streamkv.bench)."""
    return {"fused": name.startswith("cudagraph_fused"), "fused_gemv": name == "cudagraph_fused_gemv"}


__all__ = ["BACKENDS", "attach_backend", "check_backend", "graph_kernels"]
