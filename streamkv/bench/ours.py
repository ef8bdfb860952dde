"""Our paths in the benchmark: an evaluator per case, built as `python run.py` builds one (the runner's
make_evaluator, then streamkv.backends.registry.attach_backend), timed by its own run()."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from streamkv.backends.registry import GRAPH, attach_backend
from streamkv.bench.cases import Case
from streamkv.bench.measure import kernel_profile, profile_delta
from streamkv.policies import register_configs
from streamkv.runner import make_evaluator

ROOT = Path(__file__).resolve().parents[2]
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def our_evaluator(case: Case, model, tokenizer, n_tokens: int, device, dtype, n_sink: int, window: int,
                  gemv=None):
    """An evaluator for `case` on `model`: the run config (the case's cache manager, backend and policy;
    graph backends capture on CUDA only) wired by the runner's make_evaluator, its backend attached by
    attach_backend with `gemv` (cudagraph_fused_gemv's GemvOptions; None: their defaults)."""
    from omegaconf import OmegaConf

    capture = [f"backend.capture={str(device.type == 'cuda').lower()}"] if case.backend in GRAPH else []
    cfg = compose_run(["model=tiny_llama", f"cache={case.cache}", f"backend={case.backend}", *capture,
                       f"n_sink={n_sink}", f"window={window}", f"compress_every={case.R}", f"device={device}",
                       f"dtype={_DTYPE_NAMES[dtype]}", "progress=false", *case.policy])
    # make_evaluator attaches cfg's backend with default options: build the host side on eager, then
    # attach the case's backend with the benchmark's GemvOptions
    host_cfg = OmegaConf.merge(cfg, {"backend": {"name": "eager"}})
    ev = make_evaluator(host_cfg, model, n_tokens, device, tokenizer)
    return attach_backend(cfg, ev, tokenizer, gemv=gemv)


def run_ours(case: Case, model, tokenizer, ids, prefill, device, dtype, n_sink, window, profile_steps=0,
             gemv=None) -> dict:
    ev = our_evaluator(case, model, tokenizer, len(ids), device, dtype, n_sink, window, gemv=gemv)
    ev.warm_up(ids, prefill, 8)
    r = ev.run(ids, prefill)
    peak = r.decode_peak_mem_mb if not math.isnan(r.decode_peak_mem_mb) else r.peak_mem_mb
    out = {"prefill_ms": r.prefill_ms, "ttft_ms": r.ttft_ms, "decode_ms": r.decode_ms,
           "decode_tokens": r.decode_tokens, "peak_mem_mb": peak, "peak_mem_all_mb": r.peak_mem_mb,
           "visible_kv_mean": float(r.visible_kv[prefill:].mean()) + 1, "nll": r.nll[prefill:],
           "n_prunes": sum(1 for e in r.events if e["step"] >= prefill),
           "backend_used": getattr(ev, "backend_used", case.backend), "memory": dict(getattr(ev, "memory", {}))}
    if profile_steps:  # a run that decodes profile_steps tokens minus the same run's prefill alone
        short = ids[:prefill + 1 + profile_steps]
        base = ids[:prefill + 1]
        ev.warm_up(short, prefill, 0)
        full = kernel_profile(lambda: ev.run(short, prefill), 1, device)
        ev.warm_up(base, prefill, 0)
        pre = kernel_profile(lambda: ev.run(base, prefill), 1, device)
        out["profile"] = profile_delta(full, pre, profile_steps)
    return out
