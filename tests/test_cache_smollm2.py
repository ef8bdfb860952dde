"""Acceptance of the cache managers on the real model: SmolLM2-135M, float32 on CPU,
StreamingLLM with 4 sinks and a 124-token window, token by token from the first token, gives the
same per-token NLL with cache=ring / soft_ring / static as with cache=concat (the run.py command
`model=smollm2_135m ... policy=streaming n_sink=4 window=124 compress_every=1 prefill_tokens=0
cache=ring device=cpu dtype=float32`, in-process on 150 tokens), and likewise with compress_every=8
and policy=refresh. Tolerance 1e-4 per token; measured <= 1.4e-5 (docs/cache.md).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import evaluate, text_ids
from streamkv.cache import CACHES
from streamkv.policies import POLICIES

TOL = 1e-4
MANAGERS = [name for name in sorted(CACHES) if name != "concat"]
COMMON = ("n_sink=4", "window=124", "progress=false")
# case -> (tokens, overrides). R=1: the acceptance command exactly (token by token from the first
# token). R=8 and refresh: a 120-token prefill first (cheap), then 50 decode steps with 5 prunes.
CASES = {
    "streaming-R1": (150, ("policy=streaming", "compress_every=1", "prefill_tokens=0")),
    "streaming-R8": (170, ("policy=streaming", "compress_every=8", "prefill_tokens=120")),
    "refresh-R8": (170, ("policy=refresh", "compress_every=8", "policy.refresh_budget=8",
                         "policy.refresh_per_prune=4", "prefill_tokens=120")),
}


@functools.lru_cache(maxsize=8)
def _run(cache: str, case: str):
    n, ov = CASES[case]
    return evaluate("smollm2_135m", text_ids("smollm2_135m", n=n), f"cache={cache}", *COMMON, *ov)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("manager", MANAGERS)
def test_smollm2_manager_equals_concat(manager, case):
    if case.startswith("refresh") and "refresh" not in POLICIES:
        pytest.skip("policy refresh not registered")
    ref, r = _run("concat", case), _run(manager, case)
    assert len(ref.events) >= 5, "the case must prune"
    diff = np.abs(r.nll - ref.nll).max()
    assert diff <= TOL, f"max |NLL - concat| = {diff:.2e}"
    assert r.events == ref.events
    assert (r.visible_kv == ref.visible_kv).all()
