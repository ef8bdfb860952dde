"""Run-level metrics computed from the per-token trace and the event log."""

from __future__ import annotations

import math

import numpy as np

from streamkv.passkey import answer_metrics
from streamkv.spikes import SPIKE_K, spike_metrics


def summarize(result, reference=None, spike_k: int = SPIKE_K) -> dict:
    """Run metrics (docs/run-record.md). reference: optional per-token NLL of a reference run on the
    same text (e.g. strict streaming), for the spike statistics (streamkv.spikes); without it the
    spikes are measured against the mean NLL before each prune."""
    nll_mean = float(np.mean(result.nll))
    drops = np.array([e["dropped"] for e in result.events], dtype=np.int64)
    decode_tokens = result.decode_tokens
    m = {
        "ppl": math.exp(nll_mean), "nll_mean": nll_mean,
        "tpot_ms": result.decode_ms / decode_tokens if decode_tokens else float("nan"),
        "ttft_ms": result.ttft_ms, "prefill_ms": result.prefill_ms, "total_s": result.total_s,
        "peak_mem_mb": result.peak_mem_mb, "prefill_tokens": result.prefill_tokens,
        "decode_tokens": decode_tokens,
        "visible_kv_min": int(result.visible_kv.min()), "visible_kv_mean": float(result.visible_kv.mean()),
        "visible_kv_max": int(result.visible_kv.max()),
        "n_prunes": len(drops),
        "drop_min": int(drops.min()) if len(drops) else 0,
        "drop_median": float(np.median(drops)) if len(drops) else 0.0,
        "drop_max": int(drops.max()) if len(drops) else 0,
        "refreshed_total": int(sum(e.get("refreshed", 0) for e in result.events)),
    }
    m.update(spike_metrics(result.nll, result.index, result.events, k=spike_k, reference=reference))
    m.update(step_time_metrics(getattr(result, "step_ms", None)))
    m.update(answer_metrics(result.nll, getattr(result, "top1", None), getattr(result, "answer", None)))
    m["max_position"] = getattr(result, "max_position", None)
    return m


STEADY_AFTER = 64  # decode steps left out of tpot_steady_ms (warm caches, allocator, the first prunes)


def step_time_metrics(step_ms) -> dict:
    """tpot_p50_ms / tpot_p90_ms (over the decode steps' host times, tokens.parquet step_ms) and
    tpot_steady_ms (their mean after the first STEADY_AFTER decode steps); None when not measured."""
    steps = np.asarray([] if step_ms is None else step_ms, dtype=np.float64)
    steps = steps[~np.isnan(steps)]  # NaN: the prefill's tokens
    if not len(steps):
        return {"tpot_p50_ms": None, "tpot_p90_ms": None, "tpot_steady_ms": None}
    steady = steps[STEADY_AFTER:]
    return {"tpot_p50_ms": float(np.percentile(steps, 50)), "tpot_p90_ms": float(np.percentile(steps, 90)),
            "tpot_steady_ms": float(steady.mean()) if len(steady) else None}
