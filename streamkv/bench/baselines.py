"""The two HF baselines timed in the same process as our paths:

  seed-style   HF eager forward + transformers DynamicCache + lazy prune every R steps by slicing the cache
               layers (`hf_seed_style`, the only code of the benchmark that touches HF cache internals)
  HF static    HF StaticCache + torch.compile(mode="reduce-overhead") dense decode at the same KV length
"""

from __future__ import annotations

import time

import numpy as np
import torch

from streamkv.bench.measure import kernel_profile
from streamkv.scoring import score
from streamkv.timing import sync


def _forward_kwargs(model) -> set:
    import inspect

    return set(inspect.signature(model.base_model.forward).parameters)


def hf_seed_style(model, ids: torch.Tensor, prefill: int, decode: int, n_sink: int, window: int, R: int,
                  profile_steps: int = 0) -> dict:
    """The seed's path: HF eager forward + DynamicCache, pruned lazily (cache > n_sink + window + R - 1)
    back to n_sink + window by slicing every cache layer. The only code here that touches HF cache
    internals (DynamicCache.layers[i].keys / .values, transformers 5.x)."""
    from transformers import DynamicCache

    device = ids.device
    cache = DynamicCache(config=model.config)
    visible = []
    nll = []

    def prune():
        n = cache.layers[0].keys.shape[-2]
        if n > n_sink + window + R - 1:
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, :n_sink], layer.keys[:, :, n - window:]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :n_sink], layer.values[:, :, n - window:]], dim=2)

    def step(t):
        visible.append(cache.layers[0].keys.shape[-2])
        out = model(input_ids=ids[None, t:t + 1], past_key_values=cache, use_cache=True)
        nll.append(score(out.logits[0], ids[t + 1:t + 2])[0])
        prune()

    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids[None, :prefill], past_key_values=cache, use_cache=True)
        prune()
        sync(device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        for t in range(prefill, prefill + 4):  # warm-up
            step(t)
        visible.clear(), nll.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        for t in range(prefill + 4, prefill + 4 + decode):
            step(t)
        sync(device)
        decode_ms = (time.perf_counter() - t0) * 1e3
        res = {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "decode_tokens": decode,
               "visible_kv_mean": float(np.mean(visible)) + 1, "nll": torch.cat(nll).float().cpu().numpy(),
               "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")}
        if profile_steps:
            it = iter(range(prefill + 4 + decode, prefill + 4 + decode + profile_steps))
            res["profile"] = kernel_profile(lambda: step(next(it)), profile_steps, device)
    return res


def hf_static_compile(model, ids: torch.Tensor, prefill: int, decode: int, profile_steps: int = 0,
                      mode: str = "reduce-overhead") -> dict:
    """HF StaticCache + torch.compile of the model's forward, dense (no eviction): the cache holds
    prefill + warm-up + decode (+ profile) tokens and the decode attends over that buffer."""
    from transformers import StaticCache

    device = ids.device
    warm = 4
    total = prefill + warm + decode + profile_steps + 1
    cache = StaticCache(config=model.config, max_cache_len=total)
    takes_cache_position = "cache_position" in _forward_kwargs(model)
    fwd = torch.compile(model.forward, mode=mode, fullgraph=True)  # compiled per call: freed below
    nll = []

    def call(f, t0, t1):
        kw = {}
        if takes_cache_position:  # transformers < 5.24 (e.g. 5.17 on the GPU machines)
            kw["cache_position"] = torch.arange(t0, t1, device=device)
        pos = torch.arange(t0, t1, device=device)[None]
        return f(input_ids=ids[None, t0:t1], past_key_values=cache, position_ids=pos, use_cache=True, **kw)

    def step(t):
        out = call(fwd, t, t + 1)
        nll.append(score(out.logits[0], ids[t + 1:t + 2])[0].clone())

    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        call(model.forward, 0, prefill)  # prefill: eager (HF's recommendation: never compile the prefill)
        sync(device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        c0 = time.perf_counter()
        for t in range(prefill, prefill + warm):  # compiles and records the CUDA graph
            step(t)
        sync(device)
        compile_s = time.perf_counter() - c0
        nll.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        for t in range(prefill + warm, prefill + warm + decode):
            step(t)
        sync(device)
        decode_ms = (time.perf_counter() - t0) * 1e3
        res = {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "decode_tokens": decode, "compile_s": compile_s,
               "visible_kv_mean": prefill + warm + decode / 2 + 1, "max_cache_len": total,
               "nll": torch.cat(nll).float().cpu().numpy(),
               "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")}
        if profile_steps:
            it = iter(range(prefill + warm + decode, prefill + warm + decode + profile_steps))
            res["profile"] = kernel_profile(lambda: step(next(it)), profile_steps, device)
    del fwd, step  # free the compiled graphs' memory pools before the next case
    torch._dynamo.reset()
    return res
