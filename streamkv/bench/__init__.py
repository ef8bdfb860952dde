"""Decode-speed benchmark: cache manager x backend x R, against two HF baselines, with the HBM roofline.

    python -m streamkv.bench                      # GPU: SmolLM2-135M (real) + random 1.1B / 7B shapes
    python -m streamkv.bench --models smollm2     # one model
    python -m streamkv.bench --smoke              # CPU, a tiny random Llama, seconds (checks the plumbing)
    python -m streamkv.bench --models pythia-2.8b # GPU: random GPT-NeoX with Pythia-2.8B's shape, float16
    python -m streamkv.bench --smoke --models tiny-neox   # CPU: the same GPT-NeoX structure at a tiny shape

Protocol (per model): the text (the offline Wikipedia articles; random-weight models read the same token
ids modulo their vocabulary) is prefilled with P = n_sink + window tokens (4 + 2048), so the cache is
full from the first decode step, then D tokens are decoded one by one, teacher-forced, under the policy.
TPOT = decode time / D (CUDA synchronized around the loop, warm-up excluded), TTFT = prefill time,
peak memory = torch.cuda.max_memory_allocated over the decode phase (and, in brackets, over the whole
timed run, prefill logits included). Baselines, in the same process: seed-style (HF eager + DynamicCache +
lazy prune by slicing) and HF StaticCache + torch.compile, dense (baselines.py).

Roofline: bytes one decode step must read (weights, the embedding table excepted when it is not the
output head, plus the visible K/V) / the read bandwidth of a large device-to-device copy measured in
the same process. Results: JSON + a Markdown table (--out), kernel profiles (torch.profiler: kernels
and GPU-busy time per token, --profile-steps) for the cases the plan marks.

Modules, one job each: shapes (the models and their text), cases (the plan), baselines (the HF paths),
ours (our evaluators), measure (bandwidth, profiles, memory), report (rows, JSON, Markdown), run (the
command line). The names below are importable from the package itself; each loads its module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "shapes": ("SHAPES", "NEOX_SHAPES", "NEOX_DTYPE", "is_neox_bench", "bench_dtype", "load_bench_model",
               "load_neox_model", "bench_ids", "weight_bytes", "kv_bytes_per_token"),
    "cases": ("Case", "SCHEDULED_POLICIES", "default_cases", "neox_cases"),
    "baselines": ("hf_seed_style", "hf_static_compile"),
    "ours": ("compose_run", "our_evaluator", "run_ours"),
    "measure": ("device_name", "copy_bandwidth", "kernel_profile", "profile_delta", "left_resident"),
    "report": ("Row", "markdown", "write_results"),
    "run": ("BenchRun", "run_case", "run_model", "main"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
