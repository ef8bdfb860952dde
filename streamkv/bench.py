"""Decode-speed benchmark: cache manager x backend x R, against two HF baselines, with the HBM roofline.

    python -m streamkv.bench                      # GPU: SmolLM2-135M (real) + random 1.1B / 7B shapes
    python -m streamkv.bench --models smollm2     # one model
    python -m streamkv.bench --smoke              # CPU, a tiny random Llama, seconds (checks the plumbing)
    python -m streamkv.bench --models pythia-2.8b # GPU: random GPT-NeoX with Pythia-2.8B's shape, float16
                                                  # (streamkv/bench_neox.py)

Protocol (per model): the text (the offline Wikipedia articles; random-weight models read the same token
ids modulo their vocabulary) is prefilled with P = n_sink + window tokens (4 + 2048), so the cache is
full from the first decode step, then D tokens are decoded one by one, teacher-forced, under the policy.
TPOT = decode time / D (CUDA synchronized around the loop, warm-up excluded), TTFT = prefill time,
peak memory = torch.cuda.max_memory_allocated over the decode phase (and, in brackets, over the whole
timed run, prefill logits included). Baselines, in the same process:

  seed-style   HF eager forward + transformers DynamicCache + lazy prune every R=32 steps by slicing
               the cache layers (`hf_seed_style`, the only code here that touches HF cache internals)
  HF static    HF StaticCache + torch.compile(mode="reduce-overhead") dense decode at the same KV length

Roofline: bytes one decode step must read (weights, the embedding table excepted when it is not the
output head, plus the visible K/V) / the read bandwidth of a large device-to-device copy measured in
the same process. Results: JSON + a Markdown table (--out), kernel profiles (torch.profiler: kernels
and GPU-busy time per token) for the paths named in --profile.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamkv.backends.graph import GemvOptions

ROOT = Path(__file__).resolve().parent.parent
GEMV = GemvOptions()  # cudagraph_fused_gemv's options (--gemv-max-mb)

# Llama shapes for the random-weight models (TinyLlama-1.1B, Llama-2-7B).
SHAPES = {
    # SmolLM2-135M's shape with random weights: the same TPOT as the real model (timings do not depend on
    # the values), for a GPU machine that has no copy of the real weights
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


@dataclass
class Case:
    label: str  # what the table shows in the "path" column
    kind: str  # ours | seed | hf_static
    cache: str = "concat"
    backend: str = "eager"
    policy: tuple = ()  # extra overrides, e.g. ("policy=max_drop", "policy.max_drop=8")
    policy_name: str = "streaming"
    R: int = 32
    decode: int = 0  # decode steps (0: the model's default for the kind)
    profile: bool = False


@dataclass
class Row:
    model: str
    label: str
    cache: str
    backend: str
    policy: str
    R: int
    status: str = "ok"
    error: str = ""
    prefill_tokens: int = 0
    decode_tokens: int = 0
    tpot_ms: float = float("nan")
    ttft_ms: float = float("nan")
    prefill_ms: float = float("nan")
    peak_mem_mb: float = float("nan")  # decode phase (prefill logits excluded)
    peak_mem_all_mb: float = float("nan")  # whole timed run, prefill included
    weights_mb: float = float("nan")
    kv_capacity_mb: float = float("nan")
    kv_capacity_slots: int = 0
    schedule_mb: float = float("nan")  # graph paths: schedule tables, step buffers (not the KV cache)
    resident_before_mb: float = float("nan")  # allocated when the case started (weights + leftovers)
    other_mb: float = float("nan")  # decode peak - resident before - KV capacity - schedule: activations,
    #                                 the graph's pool, workspaces
    visible_kv_mean: float = float("nan")
    n_prunes: int = -1  # prunes during the timed decode (our paths; -1: not counted, the HF baselines)
    roofline_ms: float = float("nan")
    roofline_frac: float = float("nan")
    ppl: float = float("nan")  # over decode steps 4 .. 4 + decode_slow: the same tokens for every path
    ppl_all: float = float("nan")  # over all decoded tokens of the path
    backend_used: str = ""
    profile: dict = field(default_factory=dict)
    left_resident: list = field(default_factory=list)  # --memory-history: what the case left allocated


# ---------------------------------------------------------------- device facts


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / float(np.median(times))


# ---------------------------------------------------------------- models and text


def load_bench_model(name: str, device: torch.device, dtype: torch.dtype):
    """(hf_model, tokenizer or None, info)."""
    from streamkv.bench_neox import is_neox_bench, load_neox_model

    if is_neox_bench(name):
        return load_neox_model(name, device, dtype)
    if name == "smollm2":
        from omegaconf import OmegaConf

        from streamkv.config import ModelConfig
        from streamkv.models import load_model

        loaded = load_model(OmegaConf.structured(ModelConfig(name="smollm2_135m", kind="gguf")), device, dtype)
        return loaded.model, loaded.tokenizer, {"weights": "real (SmolLM2-135M-Instruct GGUF, dequantized)"}
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"tie_word_embeddings": False, **SHAPES[name]}
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    return model, None, {"weights": "random (Llama config, HF init)"}


def bench_ids(n: int, vocab: int, tokenizer) -> torch.Tensor:
    from streamkv.corpora import load_text
    from streamkv.models import ByteTokenizer

    tok = tokenizer if tokenizer is not None else _smollm2_tokenizer() or ByteTokenizer()
    ids = tok.encode(load_text("wiki"))
    while len(ids) < n:  # only for very long requests: repeat the text
        ids = ids + ids
    return torch.tensor(ids[:n], dtype=torch.long) % vocab


def _smollm2_tokenizer():
    try:
        from transformers import AutoTokenizer

        from streamkv.models import converted_smollm2_dir

        return AutoTokenizer.from_pretrained(str(converted_smollm2_dir()))
    except Exception:  # offline machine without the converted checkpoint: byte ids
        return None


def weight_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes one decode step reads: all but an embedding table that is not the head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    read = total - (emb.numel() * emb.element_size() if emb.data_ptr() != head.data_ptr() else 0)
    return total, read


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * n_kv * head_dim * next(model.parameters()).element_size()


# ---------------------------------------------------------------- profiling


def kernel_profile(step, n_steps: int, device: torch.device, trace_path: Path | None = None) -> dict:
    """Run `step()` n_steps times under torch.profiler: GPU kernels per token, GPU-busy time per token,
    wall time per token, and the kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    path = trace_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"streamkv-trace-{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    if trace_path is None:
        path.unlink(missing_ok=True)
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_name: dict = {}
    for e in kernels:
        name = e.get("name", "?")[:90]
        c, d = by_name.get(name, (0, 0.0))
        by_name[name] = (c + 1, d + float(e.get("dur", 0.0)))
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    api = [e.get("name", "") for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = sum(1 for n in api if n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                           "cudaLaunchKernelExC"))  # Triton launches through the driver API
    graph_launches = sum(1 for n in api if "GraphLaunch" in n)
    return {
        "steps": n_steps,
        "kernels_per_token": len(kernels) / n_steps,
        "host_launches_per_token": launches / n_steps,
        "graph_launches_per_token": graph_launches / n_steps,
        "gpu_busy_ms_per_token": sum(float(e.get("dur", 0.0)) for e in kernels) / 1e3 / n_steps,
        "wall_ms_per_token_profiled": wall * 1e3 / n_steps,
        "top_kernels": [{"name": n, "count_per_token": c / n_steps, "ms_per_token": d / 1e3 / n_steps}
                        for n, (c, d) in top],
        "by_name": by_name,
    }


# ---------------------------------------------------------------- HF baselines


def _forward_kwargs(model) -> set:
    import inspect

    return set(inspect.signature(model.base_model.forward).parameters)


def hf_seed_style(model, ids: torch.Tensor, prefill: int, decode: int, n_sink: int, window: int, R: int,
                  profile_steps: int = 0) -> dict:
    """The seed's path: HF eager forward + DynamicCache, pruned lazily (cache > n_sink + window + R - 1)
    back to n_sink + window by slicing every cache layer. The only code here that touches HF cache
    internals (DynamicCache.layers[i].keys / .values, transformers 5.x)."""
    from transformers import DynamicCache

    from streamkv.scoring import score

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
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids[None, :prefill], past_key_values=cache, use_cache=True)
        prune()
        _sync(device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        for t in range(prefill, prefill + 4):  # warm-up
            step(t)
        visible.clear(), nll.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        for t in range(prefill + 4, prefill + 4 + decode):
            step(t)
        _sync(device)
        decode_ms = (time.perf_counter() - t0) * 1e3
        res = {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "decode_tokens": decode,
               "visible_kv_mean": float(np.mean(visible)) + 1, "nll": torch.cat(nll).float().cpu().numpy(),
               "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")}
        if profile_steps:
            it = iter(range(prefill + 4 + decode, prefill + 4 + decode + profile_steps))
            res["profile"] = kernel_profile(lambda: step(next(it)), profile_steps, device)
    return res


_COMPILED: dict = {}


def hf_static_compile(model, ids: torch.Tensor, prefill: int, decode: int, profile_steps: int = 0,
                      mode: str = "reduce-overhead") -> dict:
    """HF StaticCache + torch.compile of the model's forward, dense (no eviction): the cache holds
    prefill + warm-up + decode (+ profile) tokens and the decode attends over that buffer."""
    from transformers import StaticCache

    from streamkv.scoring import score

    device = ids.device
    warm = 4
    total = prefill + warm + decode + profile_steps + 1
    cache = StaticCache(config=model.config, max_cache_len=total)
    takes_cache_position = "cache_position" in _forward_kwargs(model)
    key = (id(model), mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model.forward, mode=mode, fullgraph=True)
    fwd = _COMPILED[key]
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
        _sync(device)
        t0 = time.perf_counter()
        call(model.forward, 0, prefill)  # prefill: eager (HF's recommendation: never compile the prefill)
        _sync(device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        c0 = time.perf_counter()
        for t in range(prefill, prefill + warm):  # compiles and records the CUDA graph
            step(t)
        _sync(device)
        compile_s = time.perf_counter() - c0
        nll.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        for t in range(prefill + warm, prefill + warm + decode):
            step(t)
        _sync(device)
        decode_ms = (time.perf_counter() - t0) * 1e3
        res = {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "decode_tokens": decode, "compile_s": compile_s,
               "visible_kv_mean": prefill + warm + decode / 2 + 1, "max_cache_len": total,
               "nll": torch.cat(nll).float().cpu().numpy(),
               "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")}
        if profile_steps:
            it = iter(range(prefill + warm + decode, prefill + warm + decode + profile_steps))
            res["profile"] = kernel_profile(lambda: step(next(it)), profile_steps, device)
    _COMPILED.pop(key, None)  # free the compiled graphs' memory pools before the next case
    torch._dynamo.reset()
    return res


# ---------------------------------------------------------------- our paths


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from streamkv.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def our_evaluator(case: Case, model, tokenizer, n_tokens: int, device, dtype, n_sink: int, window: int):
    """An evaluator for `case`; host objects (decoder, policy, host cache) built by the runner's
    make_evaluator, the backend wired as streamkv.backends.attach_backend does."""
    from streamkv.backends import GRAPH, graph_kernels
    from streamkv.cache import CACHES
    from streamkv.runner import make_evaluator

    host_cache = case.cache if case.cache in CACHES and case.backend not in GRAPH else "concat"
    dt = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    cfg = compose_run(["model=tiny_llama", f"cache={host_cache}", "backend=eager", f"n_sink={n_sink}",
                       f"window={window}", f"compress_every={case.R}", f"device={device}", f"dtype={dt}",
                       "progress=false", *case.policy])
    ev = make_evaluator(cfg, model, n_tokens, device, tokenizer)
    if case.backend in GRAPH:
        from streamkv.backends.graph import GraphEvaluator

        return GraphEvaluator(ev, layout=case.cache, capture=device.type == "cuda", tokenizer=tokenizer,
                              gemv=GEMV, **graph_kernels(case.backend))
    from streamkv.backends import functional as fn

    if case.backend == "compile":
        from streamkv.backends.compile import compiled_dense

        ev.decoder.dense = compiled_dense(fn.gather_weights(model, "compile"))
    elif case.backend == "fused":
        from streamkv.backends.fused import fused_dense

        ev.decoder.dense = fused_dense(fn.gather_weights(model, "fused"))
    ev.backend_used = case.backend
    return ev


def run_ours(case: Case, model, tokenizer, ids, prefill, device, dtype, n_sink, window, profile_steps=0) -> dict:
    ev = our_evaluator(case, model, tokenizer, len(ids), device, dtype, n_sink, window)
    ev.warm_up(ids, prefill, 8)
    r = ev.run(ids, prefill)
    peak = r.decode_peak_mem_mb if not math.isnan(r.decode_peak_mem_mb) else r.peak_mem_mb
    out = {"prefill_ms": r.prefill_ms, "ttft_ms": r.ttft_ms, "decode_ms": r.decode_ms,
           "decode_tokens": r.decode_tokens, "peak_mem_mb": peak, "peak_mem_all_mb": r.peak_mem_mb,
           "visible_kv_mean": float(r.visible_kv[prefill:].mean()) + 1, "nll": r.nll[prefill:],
           "n_prunes": sum(1 for e in r.events if e["step"] >= prefill),
           "backend_used": getattr(ev, "backend_used", case.backend), "memory": dict(getattr(ev, "memory", {}))}
    if profile_steps:
        short = ids[:prefill + 1 + profile_steps]
        base = ids[:prefill + 1]
        ev.warm_up(short, prefill, 0)
        full = kernel_profile(lambda: ev.run(short, prefill), 1, device)
        ev.warm_up(base, prefill, 0)
        pre = kernel_profile(lambda: ev.run(base, prefill), 1, device)
        k = profile_steps
        out["profile"] = {
            "steps": k,
            "kernels_per_token": (full["kernels_per_token"] - pre["kernels_per_token"]) / k,
            "host_launches_per_token": (full["host_launches_per_token"] - pre["host_launches_per_token"]) / k,
            "graph_launches_per_token": (full["graph_launches_per_token"] - pre["graph_launches_per_token"]) / k,
            "gpu_busy_ms_per_token": (full["gpu_busy_ms_per_token"] - pre["gpu_busy_ms_per_token"]) / k,
            "wall_ms_per_token_profiled": (full["wall_ms_per_token_profiled"] - pre["wall_ms_per_token_profiled"]) / k,
        }
        diff = {name: (c - pre["by_name"].get(name, (0, 0.0))[0], d - pre["by_name"].get(name, (0, 0.0))[1])
                for name, (c, d) in full["by_name"].items()}
        out["profile"]["top_kernels"] = [{"name": n, "count_per_token": c / k, "ms_per_token": d / 1e3 / k}
                                         for n, (c, d) in sorted(diff.items(), key=lambda kv: -kv[1][1])[:12]]
    return out


# ---------------------------------------------------------------- the plan


# the controlled policies timed next to streaming on the graph paths: (overrides, table name)
SCHEDULED_POLICIES = ((("policy=max_drop", "policy.max_drop=8"), "max_drop (8)"),
                      (("policy=refresh", "policy.refresh_budget=64"), "refresh (uniform, 64)"))


def default_cases(model: str, smoke: bool, managers: set) -> list[Case]:
    from streamkv.bench_neox import is_neox_bench, neox_cases

    if is_neox_bench(model):
        return neox_cases(smoke)
    if smoke:
        cases = [Case("seed-style (HF eager + DynamicCache)", "seed", profile=True),
                 Case("HF StaticCache + torch.compile (dense)", "hf_static"),
                 Case("concat x eager", "ours", profile=True),
                 Case("ring x cudagraph (uncaptured on CPU)", "ours", "ring", "cudagraph", R=1),
                 Case("ring x cudagraph (uncaptured on CPU)", "ours", "ring", "cudagraph"),
                 Case("static x cudagraph (uncaptured on CPU)", "ours", "static", "cudagraph")]
        return cases
    big = not model.startswith("smollm2")
    cases = [Case("seed-style (HF eager + DynamicCache)", "seed", profile=True),
             Case("HF StaticCache + torch.compile (dense)", "hf_static", profile=not big),
             Case("concat x eager", "ours", profile=not big)]
    if not big:
        cases += [Case("concat x compile", "ours", backend="compile"),
                  Case("concat x fused", "ours", backend="fused")]
    for R in (1, 32, 64):
        cases.append(Case("ring x cudagraph_fused", "ours", "ring", "cudagraph_fused", R=R, profile=R == 32))
    # the same with the fused-prologue GEMVs (streamkv/backends/gemv_kernels.py)
    cases.append(Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=32, profile=True))
    cases.append(Case("ring x cudagraph", "ours", "ring", "cudagraph", R=32, profile=not big))
    if not big:
        for R in (1, 64):
            cases.append(Case("ring x cudagraph", "ours", "ring", "cudagraph", R=R))
        for backend in ("cudagraph_fused", "cudagraph"):
            cases += [Case(f"ring x {backend}", "ours", "ring", backend, R=32, policy=p, policy_name=name)
                      for p, name in SCHEDULED_POLICIES]
        # the GEMVs with the other scheduled policies and R (the same weights per step: expected no change)
        for R in (1, 64):
            cases.append(Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=R))
        cases += [Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=32, policy=p,
                       policy_name=name) for p, name in SCHEDULED_POLICIES]
        # the score baselines scored inside the graph (ring: original positions; static: positions=shift);
        # TOVA and SnapKV score only on prune steps, H2O every step
        for backend in ("cudagraph_fused", "cudagraph_fused_gemv"):
            for pol in ("tova", "h2o", "snapkv"):
                cases.append(Case(f"ring x {backend}", "ours", "ring", backend, R=32, policy=(f"policy={pol}",),
                                  policy_name=pol))
        for pol in ("tova", "h2o", "snapkv"):
            cases.append(Case("static x cudagraph_fused", "ours", "static", "cudagraph_fused", R=32,
                              policy=(f"policy={pol}", "policy.positions=shift"), policy_name=f"{pol} (shift)"))
        # entropy-driven: online in the static layout (one host sync per step), vs its slack-mode control
        for backend in ("cudagraph_fused", "cudagraph_fused_gemv"):
            for mode in ("entropy", "slack"):
                cases.append(Case(f"static x {backend}", "ours", "static", backend, R=1,
                                  policy=("policy=adaptive", f"policy.mode={mode}", "policy.extra_slack=64"),
                                  policy_name=f"adaptive {mode} 64"))
    for R in ((1, 32, 64) if not big else (1, 32)):
        cases.append(Case("static x cudagraph_fused", "ours", "static", "cudagraph_fused", R=R))
    cases.append(Case("static x cudagraph_fused_gemv", "ours", "static", "cudagraph_fused_gemv", R=32))
    if not big:
        cases.append(Case("static x cudagraph", "ours", "static", "cudagraph", R=32))
    # host-driven preallocated managers, where this checkout has them (streamkv/cache)
    for m in ("ring", "static", "soft_ring"):
        if m in managers:
            cases.append(Case(f"{m} x eager", "ours", m, "eager", R=32))
    return cases


def _alive_blocks(device) -> dict:
    """address -> (bytes, where) of every live allocation (where: call sites, when history is recorded)."""
    out = {}
    for seg in torch.cuda.memory._snapshot(device)["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames = b.get("frames") or []
                ours = [f for f in frames if "streamkv" in f["filename"]][:2]
                where = " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}"
                                   for f in (frames[:1] + ours)) or "?"
                out[b["address"]] = (b["size"], where)
    return out


def left_resident(before: dict, after: dict, top: int = 8) -> list[dict]:
    """Allocations alive after a case that were not before it, grouped by call site (largest first)."""
    by_where: dict = {}
    for addr, (size, where) in after.items():
        if addr not in before:
            by_where[where] = by_where.get(where, 0) + size
    return [{"mb": v / 2**20, "where": k} for k, v in sorted(by_where.items(), key=lambda kv: -kv[1])[:top]]


def run_model(name: str, args, device, dtype, bw: float, out_dir: Path) -> list[Row]:
    from streamkv.bench_neox import bench_dtype
    from streamkv.cache import CACHES

    dtype = bench_dtype(name, device, dtype)  # GPT-NeoX (Pythia): float16 on CUDA
    _META.setdefault("model_dtypes", {})[name] = str(dtype).replace("torch.", "")
    t_load = time.perf_counter()
    model, tokenizer, info = load_bench_model(name, device, dtype)
    print(f"[{name}] loaded in {time.perf_counter() - t_load:.1f}s ({info['weights']})", flush=True)
    n_sink, window = args.n_sink, args.window
    prefill = n_sink + window
    total_w, read_w = weight_bytes(model)
    kv_tok = kv_bytes_per_token(model)
    vocab = model.config.vocab_size
    rows = []
    ref_nll = {}
    for case in default_cases(name, args.smoke, set(CACHES)):
        if args.only and not any(s in f"{case.label} {case.policy_name} R={case.R}" for s in args.only):
            continue
        slow = case.kind != "ours" or case.backend in ("eager", "compile", "fused")
        # our slow paths decode 4 more: the PPL column compares decode steps 4 .. 4 + decode_slow everywhere
        decode = case.decode or ((args.decode_slow + (4 if case.kind == "ours" else 0)) if slow else args.decode)
        policy_label = case.policy_name
        row = Row(model=name, label=case.label, cache=case.cache if case.kind == "ours" else "-",
                  backend=case.backend if case.kind == "ours" else "-", policy=policy_label if case.kind != "hf_static"
                  else "full (dense)", R=case.R if case.kind != "hf_static" else 0,
                  weights_mb=total_w / 2**20)
        t_case = time.perf_counter()
        if device.type == "cuda":
            row.resident_before_mb = torch.cuda.memory_allocated(device) / 2**20
        alive_before = _alive_blocks(device) if args.memory_history and device.type == "cuda" else None
        k = args.profile_steps if case.profile and args.profile_steps else 0
        try:
            ids = bench_ids(prefill + max(decode, case.R) + 8 + k + 2, vocab, tokenizer).to(device)
            if case.kind == "seed":
                # HF's SDPA may pick cuDNN, which builds a plan per new key length (~40 ms each on an H100):
                # a discarded pass over one whole prune cycle first, so the timed steps are the steady state
                hf_seed_style(model, ids, prefill, case.R, n_sink, window, case.R)
                res = hf_seed_style(model, ids, prefill, decode, n_sink, window, case.R, profile_steps=k)
                row.ttft_ms = res["prefill_ms"]
            elif case.kind == "hf_static":
                res = hf_static_compile(model, ids, prefill, decode, profile_steps=k, mode=args.hf_compile_mode)
                row.ttft_ms = res["prefill_ms"]
                row.kv_capacity_slots = res["max_cache_len"]
                row.kv_capacity_mb = res["max_cache_len"] * kv_tok / 2**20
            else:
                ids = ids[:prefill + decode + 1]
                res = run_ours(case, model, tokenizer, ids, prefill, device, dtype, n_sink, window, profile_steps=k)
                row.ttft_ms = res["ttft_ms"]
                row.backend_used = res["backend_used"]
                mem = res.get("memory") or {}
                if "kv_cache_bytes" in mem:
                    row.kv_capacity_mb = mem["kv_cache_bytes"] / 2**20
                    row.kv_capacity_slots = mem["kv_capacity_slots"]
                if "schedule_and_buffers_bytes" in mem:
                    row.schedule_mb = mem["schedule_and_buffers_bytes"] / 2**20
            row.prefill_tokens = prefill
            row.decode_tokens = res["decode_tokens"]
            row.prefill_ms = res["prefill_ms"]
            row.tpot_ms = res["decode_ms"] / res["decode_tokens"]
            row.peak_mem_mb = res["peak_mem_mb"]
            row.peak_mem_all_mb = res.get("peak_mem_all_mb", res["peak_mem_mb"])
            if not math.isnan(row.kv_capacity_mb):  # against what was resident before the case (the weights
                # and whatever earlier cases of this process left, e.g. cuBLAS workspaces per stream)
                base = row.weights_mb if math.isnan(row.resident_before_mb) else row.resident_before_mb
                row.other_mb = row.peak_mem_mb - base - row.kv_capacity_mb - \
                    (0.0 if math.isnan(row.schedule_mb) else row.schedule_mb)
            row.visible_kv_mean = res["visible_kv_mean"]
            row.n_prunes = res.get("n_prunes", -1)
            row.roofline_ms = (read_w + row.visible_kv_mean * kv_tok) / bw * 1e3
            row.roofline_frac = row.roofline_ms / row.tpot_ms
            nll = res["nll"]
            if case.kind == "ours":  # the baselines score decode steps 4 .. 4 + decode_slow (after their warm-up)
                row.ppl_all = float(math.exp(float(np.mean(nll))))
                nll = nll[4:4 + args.decode_slow]
            row.ppl = float(math.exp(float(np.mean(nll))))
            ref_nll.setdefault((policy_label, case.R), nll)
            row.profile = {k: v for k, v in res.get("profile", {}).items() if k != "by_name"}
        except Exception as exc:  # one failing path must not lose the others' numbers
            row.status = "failed"
            row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            traceback.print_exc()
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if alive_before is not None:
                row.left_resident = left_resident(alive_before, _alive_blocks(device))
                for e in row.left_resident:
                    print(f"[{name}]   left resident {e['mb']:7.1f} MB  {e['where']}", flush=True)
        print(f"[{name}] {row.label:42s} {row.policy:24s} R={row.R:<3d} TPOT {row.tpot_ms:8.3f} ms  "
              f"peak {row.peak_mem_mb:8.1f} MB  roofline {row.roofline_frac * 100:5.1f}%  PPL {row.ppl:8.3f}  "
              f"[{row.status}{' ' + row.error if row.error else ''}] ({time.perf_counter() - t_case:.1f}s)", flush=True)
        rows.append(row)
        write_results(out_dir, rows_all=_ALL_ROWS + rows, meta=_META)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- output

_ALL_ROWS: list = []
_META: dict = {}


def _fmt(x, nd=2):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [f"Device: **{meta.get('device', '?')}**; torch {meta.get('torch')}, transformers "
             f"{meta.get('transformers')}; copy bandwidth (read + write) {meta.get('copy_bw_gbs', 0):.0f} GB/s; "
             f"n_sink {meta.get('n_sink')} + window {meta.get('window')}, prefill {meta.get('n_sink', 0) + meta.get('window', 0)} "
             f"tokens then teacher-forced decode; {meta.get('dtype')}.", ""]
    for model in dict.fromkeys(r.model for r in rows):
        mrows = [r for r in rows if r.model == model]
        seed = next((r.tpot_ms for r in mrows if r.label.startswith("seed") and r.status == "ok"), float("nan"))
        hfs = next((r.tpot_ms for r in mrows if r.label.startswith("HF Static") and r.status == "ok"), float("nan"))
        mdt = meta.get("model_dtypes", {}).get(model)
        lines += [f"### {model}" + (f" ({mdt})" if mdt and mdt != meta.get("dtype") else ""), "",
                  "| path (manager x backend) | policy | R | prunes | TPOT ms | x seed | x HF static | TTFT ms "
                  "| peak MB decode (incl. prefill) | weights MB | KV cap MB (slots) | sched MB | other MB† | roofline ms | % roofline "
                  "| PPL |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mrows:
            if r.status != "ok":
                lines.append(f"| {r.label} | {r.policy} | {r.R} | failed: {r.error} |||||||||||||")
                continue
            used = f" ({r.backend_used})" if r.backend_used and r.backend_used != r.backend else ""
            lines.append(
                f"| {r.label}{used} | {r.policy} | {r.R or '–'} | {r.n_prunes if r.n_prunes >= 0 else '–'} "
                f"| {_fmt(r.tpot_ms, 3)} | {_fmt(seed / r.tpot_ms, 1)} "
                f"| {_fmt(hfs / r.tpot_ms, 2)} | {_fmt(r.ttft_ms, 1)} | {_fmt(r.peak_mem_mb, 0)} "
                f"({_fmt(r.peak_mem_all_mb, 0)}) | {_fmt(r.weights_mb, 0)} "
                f"| {_fmt(r.kv_capacity_mb, 1)} ({r.kv_capacity_slots or '–'}) | {_fmt(r.schedule_mb, 1)} "
                f"| {_fmt(r.other_mb, 0)} "
                f"| {_fmt(r.roofline_ms, 3)} | {_fmt(r.roofline_frac * 100, 1)} | {_fmt(r.ppl, 3)} |")
        lines.append("*PPL over the same decoded tokens for every path (steps 4 .. 4 + "
                     f"{meta.get('decode_slow')} after the prefill); the seed-style path keeps HF's positions "
                     "after slicing, so its PPL differs by design. †decode peak - memory resident when the case "
                     "started (weights and leftovers of earlier cases) - KV capacity - schedule.")
        lines.append("")
        prof = [r for r in mrows if r.profile]
        if prof:
            lines += [f"Kernel profile ({model}, torch.profiler, per decoded token):", "",
                      "| path | R | GPU kernels | host launches | graph launches | GPU busy ms | wall ms (profiled) |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in prof:
                p = r.profile
                lines.append(f"| {r.label} | {r.R or '–'} | {p['kernels_per_token']:.0f} | "
                             f"{p['host_launches_per_token']:.0f} | {p['graph_launches_per_token']:.1f} | "
                             f"{p['gpu_busy_ms_per_token']:.3f} | {p['wall_ms_per_token_profiled']:.3f} |")
            lines.append("")
            for r in prof:
                top = r.profile.get("top_kernels") or []
                if top:
                    lines.append(f"Top GPU kernels per token, {r.label} (R={r.R or '–'}): " + "; ".join(
                        f"{t['name'][:60]} x{t['count_per_token']:.0f} {t['ms_per_token'] * 1e3:.0f} us"
                        for t in top[:8]))
                    lines.append("")
    return "\n".join(lines)


def write_results(out_dir: Path, rows_all: list[Row], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows_all]}
    tmp = out_dir / "bench.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, out_dir / "bench.json")
    (out_dir / "bench.md").write_text(markdown(rows_all, meta))


def _dtypes(models, device, dtype) -> str:
    from streamkv.bench_neox import bench_dtype

    return ", ".join(sorted({str(bench_dtype(m, device, dtype)).replace("torch.", "") for m in models}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamkv.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random Llama, small window: checks the plumbing")
    ap.add_argument("--models", default=None, help="comma list of smollm2, smollm2-shape (random weights), llama-1.1b, llama-7b, pythia-2.8b (random "
                    "GPT-NeoX, float16) (default: smollm2, llama-1.1b, llama-7b)")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=1024, help="decode steps timed for the fast paths")
    ap.add_argument("--decode-slow", type=int, default=128, help="decode steps for eager paths and baselines")
    ap.add_argument("--profile-steps", type=int, default=16, help="decode steps under torch.profiler (0: none)")
    ap.add_argument("--hf-compile-mode", default="reduce-overhead")
    ap.add_argument("--only", nargs="*", default=None, help="run only cases whose label contains one of these")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gemv-configs", metavar="JSON", help="cudagraph_fused_gemv: launch configs tuned by "
                    "scripts/gemv_bench.py (its --out), added to gemv_kernels.MEASURED for this run")
    ap.add_argument("--gemv-max-mb", type=float, default=None, help="cudagraph_fused_gemv: fuse GEMVs with "
                    "weights up to this many MiB (default: GemvOptions.max_bytes, 4; 0 = no limit)")
    ap.add_argument("--memory-history", action="store_true", help="CUDA: record allocation call sites and list, "
                    "per case, what it left allocated (the process's one-time overheads)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device(args.device or "cpu")
        dtype = torch.float32
        models = args.models.split(",") if args.models else ["tiny"]  # tiny, tiny-neox
        args.window, args.decode, args.decode_slow = min(args.window, 64), min(args.decode, 24), min(args.decode_slow, 12)
        args.profile_steps = min(args.profile_steps, 4)
        args.hf_compile_mode = "default"
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        models = args.models.split(",") if args.models else ["smollm2", "llama-1.1b", "llama-7b"]
    out_dir = Path(args.out)
    gemv_meta = {}
    if args.gemv_configs:
        from streamkv.backends import gemv_kernels

        added = gemv_kernels.load_measured(args.gemv_configs)
        gemv_meta["gemv_configs_added"] = {f"{n}x{k}": list(c) for (n, k), c in added.items()}
        print(f"gemv configs from {args.gemv_configs}: {gemv_meta['gemv_configs_added']}", flush=True)
    if args.gemv_max_mb is not None:
        global GEMV
        GEMV = GemvOptions(max_bytes=None if args.gemv_max_mb == 0 else int(args.gemv_max_mb * 2**20))
        gemv_meta["gemv_max_bytes"] = GEMV.max_bytes
    if args.memory_history and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    import transformers

    _ALL_ROWS.clear()  # one call of main() = one benchmark (tests call it several times in one process)
    _META.clear()
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    _META.update({"device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": sys.version.split()[0], "copy_bw_gbs": bw / 1e9, "n_sink": args.n_sink,
                  "window": args.window, "dtype": _dtypes(models, device, dtype), "decode": args.decode,
                  "decode_slow": args.decode_slow, "hf_compile_mode": args.hf_compile_mode,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **gemv_meta})
    print(f"device: {_META['device']}  copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    for name in models:
        rows = run_model(name, args, device, dtype, bw, out_dir)
        _ALL_ROWS.extend(rows)
        write_results(out_dir, _ALL_ROWS, _META)
    print()
    print(markdown(_ALL_ROWS, _META))
    return 0 if all(r.status == "ok" for r in _ALL_ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
