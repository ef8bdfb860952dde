"""Backends on the CPU: config errors (one line, before anything loads), the graph path's slot
schedule and layouts against concat + eager (the captured step run un-captured, float32, same
per-token NLL to 1e-5, same events), the score-based policies' device-side eviction (same tokens
kept, NLL to 2e-6), the entropy-driven fallback, the compile backend's tracing,
and our Triton kernels through Triton's interpreter (skipped where triton is not installed).
The GPU side (capture, bf16 tolerance, liger) is scripts/gpu_check.py; speed is streamkv.bench."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, compose, load, run_cli, text_ids

KIND = "tiny_llama"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, expected", [
    (["backend.name=nope"], "backend: 'nope' is not one of"),
    (["backend=cudagraph", "cache=ring"], "backend: 'cudagraph' needs a CUDA device (device=cpu)"),
    (["backend=cudagraph_fused", "cache=static"], "needs a CUDA device"),
    (["backend=cudagraph_fused_gemv", "cache=ring"], "backend: 'cudagraph_fused_gemv' needs a CUDA device"),
    (["backend=cudagraph_fused_gemv", "device=cuda"], "needs a preallocated cache manager"),
    (["backend=fused"], "backend: 'fused' needs a CUDA device"),
    (["backend=cudagraph", "device=cuda"], "needs a preallocated cache manager (cache=ring or cache=static), "
                                           "not cache=concat"),
    (["backend=fused", "model=tiny_neox"], "supports the Llama family only"),
])
def test_config_errors(overrides, expected):
    from streamkv.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_cudagraph_on_cpu_fails_at_once():
    r = run_cli("backend=cudagraph", "cache=ring", "device=cpu", timeout=120)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "needs a CUDA device" in err[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_every_backend_has_a_preset():
    from streamkv.backends.registry import BACKENDS

    presets = {p.stem for p in (ROOT / "conf" / "backend").glob("*.yaml")}
    assert presets == set(BACKENDS)
    for name in BACKENDS:
        cfg = compose(f"backend={name}", "device=cuda", "cache=ring")
        assert cfg.backend.name == name


# ---------------------------------------------------------------- the functional layer = HF modules


def _evaluator(*overrides, n):
    from streamkv.runner import make_evaluator

    cfg = compose(f"model={KIND}", "progress=false", *overrides)
    return cfg, make_evaluator(cfg, load(KIND).model, n, torch.device("cpu"), load(KIND).tokenizer)


def test_dense_hook_matches_hf_modules():
    """Decoder.dense with the plain functions (what compile compiles) = the HF modules, float32."""
    from streamkv.backends import functional as fn

    ids = text_ids(KIND, n=150)
    cfg, ev = _evaluator("window=32", "compress_every=4", "prefill_tokens=40", n=len(ids))
    ref = ev.run(ids, 40)
    cfg, ev = _evaluator("window=32", "compress_every=4", "prefill_tokens=40", n=len(ids))
    ev.decoder.dense = fn.DenseBlocks(fn.gather_weights(load(KIND).model))
    r = ev.run(ids, 40)
    np.testing.assert_allclose(r.nll, ref.nll, atol=1e-5, rtol=0)


def test_compile_backend_traces_and_matches():
    """The compile backend's functions go through torch.compile (dynamo + AOT autograd here; inductor
    codegen takes ~1 min on a 2-core CPU, it runs in the GPU benchmark) with one graph for all layers."""
    from streamkv.backends.registry import attach_backend
    from streamkv.backends import functional as fn
    from streamkv.backends.compile import compiled_dense

    ids = text_ids(KIND, n=60)
    cfg, ev = _evaluator("window=16", "compress_every=4", n=len(ids))
    ref = ev.run(ids, 0)
    torch._dynamo.reset()
    cfg, ev = _evaluator("window=16", "compress_every=4", "backend=compile", n=len(ids))
    ev = attach_backend(cfg, ev)
    assert ev.backend_used == "compile" and ev.decoder.dense is not None
    ev.decoder.dense = compiled_dense(fn.gather_weights(load(KIND).model), backend="aot_eager")
    r = ev.run(ids, 0)
    np.testing.assert_allclose(r.nll, ref.nll, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, gemv", [("cudagraph", False), ("cudagraph_fused", False),
                                        ("cudagraph_fused_gemv", True)])
def test_graph_backends_wire_their_kernels(name, gemv):
    """attach_backend gives each graph backend its own kernels, and backend_used names it."""
    from streamkv.backends.registry import attach_backend
    from streamkv.backends.graph import GraphEvaluator

    cfg, ev = _evaluator(f"backend={name}", "cache=ring", "device=cuda", "window=16", n=40)  # built on the CPU
    g = attach_backend(cfg, ev)
    assert isinstance(g, GraphEvaluator)
    assert (g.fused, g.fused_gemv, g.backend_used) == (name != "cudagraph", gemv, name)


# ---------------------------------------------------------------- the graph path, un-captured


POLICIES = {
    "strict": ("n_sink=4", "window=24", "compress_every=1"),
    "lazy_prefill": ("n_sink=4", "window=24", "compress_every=8", "prefill_tokens=64"),
    "full": ("policy=full",),
    "max_drop": ("policy=max_drop", "policy.max_drop=3", "n_sink=4", "window=24", "compress_every=8"),
    "overlap": ("policy=overlap", "policy.overlap=4", "n_sink=4", "window=24", "compress_every=8"),
    "refresh": ("policy=refresh", "policy.refresh_budget=4", "n_sink=4", "window=24", "compress_every=8"),
    "refresh_structural": ("policy=refresh", "policy.refresh_budget=4", "policy.refresh_select=structural",
                           "n_sink=4", "window=16", "compress_every=8"),
    "adaptive_slack": ("policy=adaptive", "policy.mode=slack", "policy.extra_slack=6", "n_sink=4", "window=24"),
}


def _graph(layout, *overrides, n):
    from streamkv.backends.graph import GraphEvaluator

    cfg, ev = _evaluator(*overrides, n=n)
    return cfg, GraphEvaluator(ev, layout, capture=False, tokenizer=load(KIND).tokenizer)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_graph_step_matches_concat_eager(policy):
    ids = text_ids(KIND, n=160)
    cfg, ev = _evaluator(*POLICIES[policy], n=len(ids))
    ref = ev.run(ids, cfg.prefill_tokens)
    for layout in ("ring", "static"):
        cfg, g = _graph(layout, *POLICIES[policy], n=len(ids))
        r = g.run(ids, cfg.prefill_tokens)
        assert g.backend_used == "cudagraph"
        np.testing.assert_allclose(r.nll, ref.nll, atol=1e-5, rtol=0, err_msg=layout)
        np.testing.assert_allclose(r.entropy, ref.entropy, atol=1e-4, rtol=0, err_msg=layout)
        assert r.events == ref.events, layout
        assert (r.visible_kv == ref.visible_kv).all(), layout
        assert g.memory["kv_capacity_slots"] == max(ref.visible_kv) + 1 or policy == "lazy_prefill"


def test_step_times_cover_the_decode():
    """step_ms: one host wall time per decode step, NaN for the prefill's tokens, summing to the decode time."""
    ids = text_ids(KIND, n=120)
    cfg, ev = _evaluator(*POLICIES["refresh"], "prefill_tokens=40", n=len(ids))
    _, g = _graph("ring", *POLICIES["refresh"], "prefill_tokens=40", n=len(ids))
    for r in (ev.run(ids, 40), g.run(ids, 40)):
        assert r.step_ms.shape == (len(ids) - 1,)
        assert np.isnan(r.step_ms[:40]).all() and (r.step_ms[40:] >= 0).all()
        assert r.step_ms[40:].sum() == pytest.approx(r.decode_ms, rel=0.02)


def test_host_decode_attends_without_cudnn_sdpa(monkeypatch):
    """On CUDA the host-driven decode (warm-up and run) excludes cuDNN's SDPA, which builds a plan per new key
    length (~40 ms each on an H100, docs/results/README.md finding 7), and restores the flag afterwards."""
    from streamkv import evaluate

    as_on_cuda = evaluate.host_attention
    monkeypatch.setattr(evaluate, "host_attention", lambda device: as_on_cuda(torch.device("cuda")))
    ids = text_ids(KIND, n=40)
    _, ev = _evaluator(*POLICIES["refresh"], n=len(ids))
    forward, cudnn_on = ev.decoder.forward, []

    def spy(*args):
        cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
        return forward(*args)

    monkeypatch.setattr(ev.decoder, "forward", spy)
    ev.warm_up(ids, 0, 4)
    ev.run(ids, 0)
    assert len(cudnn_on) == 4 + len(ids) - 1 and not any(cudnn_on)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert isinstance(as_on_cuda(torch.device("cpu")), contextlib.nullcontext)  # CPU: untouched


@pytest.mark.parametrize("policy", ["strict", "refresh", "max_drop"])
def test_static_compaction_without_a_permutation_table(policy, monkeypatch):
    """Static layout: when every prune keeps cache order the kept-first permutation comes from the device's
    valid mask (no [n_prunes, capacity] table); it gives the same run as the schedule's table."""
    import streamkv.backends.schedule as schedule

    ids = text_ids(KIND, n=160)
    runs = {}
    for table in (False, True):
        monkeypatch.setattr(schedule, "PERM_TABLE_ALWAYS", table)
        cfg, g = _graph("static", *POLICIES[policy], n=len(ids))
        runs[table] = g.run(ids, cfg.prefill_tokens)
        assert g.compacting and (g.perms is None) == (not table)
        assert len(g.s.perms) == (g.s.compact.sum() if table else 0)
    np.testing.assert_array_equal(runs[False].nll, runs[True].nll)
    assert runs[False].events == runs[True].events


def test_graph_ring_large_positions():
    """Ring keys live at their true positions (here ~12k): float32 RoPE there must still give
    StreamingLLM's distances (concat re-rotates at positions < 40)."""
    from streamkv.corpora import load_text

    ids = torch.tensor(load(KIND).tokenizer.encode(load_text("book"))[:12600])
    P = 12000
    args = ("dataset=book", "n_sink=4", "window=32", "compress_every=4", f"prefill_tokens={P}")
    cfg, ev = _evaluator(*args, n=len(ids))
    ref = ev.run(ids, P)
    cfg, g = _graph("ring", *args, n=len(ids))
    r = g.run(ids, P)
    np.testing.assert_allclose(r.nll[P:], ref.nll[P:], atol=1e-4, rtol=0)
    assert r.events == ref.events


def test_schedule_rerotates_only_after_prunes():
    from streamkv.backends.schedule import build_schedule
    from streamkv.policies import build_policy

    S, W, R = 4, 16, 4
    cfg = compose(f"model={KIND}", f"n_sink={S}", f"window={W}", f"compress_every={R}")
    s = build_schedule(build_policy(cfg), "ring", np.arange(120), 0)
    assert s.capacity == S + W + R
    prune_steps = [e["step"] for e in s.events]
    fixed = np.flatnonzero((s.fix_slot < s.capacity).any(axis=1))
    assert list(fixed) == [p + 1 for p in prune_steps if p + 1 < 119]
    assert s.n_fix == S and s.n_side == S  # the sinks, re-rotated from their un-rotated copies
    # the eviction table holds one row per prune (+ row 0: none), not one per step
    assert s.evict.shape == (1 + len(prune_steps), R) and (s.evict[0] == s.capacity).all()
    assert list(np.flatnonzero(s.evict_row)) == prune_steps and (s.evict_row[prune_steps] == np.arange(1, len(prune_steps) + 1)).all()
    assert (s.side_write[:S] == np.arange(S)).all() and (s.side_write[S:] == s.n_side).all()


SCORED = {  # score-based policies inside the graph step (ring layout): the keep mask computed on the device
    "tova_R1": ("policy=tova", "compress_every=1"),
    "tova_R8": ("policy=tova", "compress_every=8"),
    "tova_R8_prefill": ("policy=tova", "compress_every=8", "prefill_tokens=64"),
    "h2o_R1": ("policy=h2o", "compress_every=1"),
    "h2o_R8": ("policy=h2o", "compress_every=8"),
    "h2o_R8_prefill": ("policy=h2o", "compress_every=8", "prefill_tokens=64"),
    "h2o_R1_prefill_recent0": ("policy=h2o", "policy.recent_frac=0", "compress_every=1", "prefill_tokens=40"),
    "snapkv_R1": ("policy=snapkv", "compress_every=1"),
    "snapkv_R8": ("policy=snapkv", "compress_every=8"),
    "snapkv_R8_prefill_max3": ("policy=snapkv", "compress_every=8", "prefill_tokens=64", "policy.pooling=max",
                               "policy.kernel_size=3", "policy.obs_window=5"),
}


@pytest.mark.parametrize("policy", list(SCORED))
def test_graph_scored_eviction_matches_concat_eager(policy):
    """tova / h2o / snapkv in the graph step (ring, un-captured, float32): the same tokens kept at every
    prune (the device's topk over the device's scores = keep_top over the eager policy's), the same
    events, and the same per-token NLL as concat x eager."""
    _scored_matches_concat_eager("ring", ("n_sink=4", "window=24", *SCORED[policy]))


@pytest.mark.parametrize("policy", list(SCORED))
def test_graph_scored_shift_static_matches_concat_eager(policy):
    """tova / h2o / snapkv with positions=shift in the static layout (un-captured, float32): keys
    rotated at their slot index, the kept slots compacted to the front by a permutation computed on the
    device from the keep mask; the same kept tokens, events and per-token NLL as concat x eager with
    positions=shift."""
    _scored_matches_concat_eager("static", ("n_sink=4", "window=24", *SCORED[policy], "policy.positions=shift"))


@pytest.mark.parametrize("policy, lazy", [("tova_R8", True), ("snapkv_R8", True), ("h2o_R8", False)])
def test_graph_scores_only_on_prune_steps(policy, lazy, monkeypatch):
    """TOVA's and SnapKV's scores are read only by a prune: the decode steps score only when one follows
    (H2O accumulates on every step). Counted per layer call of ScoredEviction.observe."""
    from streamkv.backends.graph import ScoredEviction

    calls = []
    observe = ScoredEviction.observe
    monkeypatch.setattr(ScoredEviction, "observe", lambda self, i, *a: calls.append(i) or observe(self, i, *a))
    ids = text_ids(KIND, n=160)
    cfg, g = _graph("ring", "n_sink=4", "window=24", *SCORED[policy], n=len(ids))
    g.run(ids, cfg.prefill_tokens)
    n_layers, prune = len(g.w.layers), g.s.scored.prune
    steps = prune[:len(ids) - 1].sum() if lazy else len(ids) - 1
    assert g.scored.lazy == lazy and len(calls) == n_layers * steps and 0 < prune.sum() < len(ids) // 4


@pytest.mark.parametrize("policy", ["snapkv_R8", "snapkv_R8_prefill_max3"])
def test_graph_snapkv_scores_all_layers_at_once(policy, monkeypatch):
    """SnapKV's window scores run once per scoring step (prefill prune included), over every layer's keys
    together, not once per layer."""
    from streamkv.backends.graph import ScoredEviction

    calls = []
    scores = ScoredEviction._window_scores
    monkeypatch.setattr(ScoredEviction, "_window_scores",
                        lambda self, keys: calls.append(keys.shape) or scores(self, keys))
    ids = text_ids(KIND, n=160)
    cfg, g = _graph("ring", "n_sink=4", "window=24", *SCORED[policy], n=len(ids))
    g.run(ids, cfg.prefill_tokens)
    n_prunes = int(g.s.scored.prune[:len(ids) - 1].sum()) + int(g.s.scored.prefill_prune)
    assert len(calls) == n_prunes > 3
    assert all(shape[0] == len(g.w.layers) for shape in calls)


def _scored_matches_concat_eager(layout, args):
    ids = text_ids(KIND, n=160)
    cfg, ev = _evaluator(*args, n=len(ids))
    kept_ref = []
    evict = ev.cache.evict

    def spy_evict(keep):
        evict(keep)
        kept_ref.append(ev.cache.token_pos.copy())

    ev.cache.evict = spy_evict
    ref = ev.run(ids, cfg.prefill_tokens)

    cfg, g = _graph(layout, *args, n=len(ids))
    kept = []
    replay, prefill = g._replay, g._prefill

    def held():
        C = g.s.capacity
        return np.sort(g.scored.slot_pos[:C][g.valid[:C]].numpy())

    def spy_replay(t):
        replay(t)
        if g.s.scored.prune[t]:
            kept.append(held())

    def spy_prefill(P):
        prefill(P)
        if g.s.scored.prefill_prune:
            kept.append(held())

    g._replay, g._prefill = spy_replay, spy_prefill
    r = g.run(ids, cfg.prefill_tokens)
    assert g.backend_used == "cudagraph" and g.fallback_reason is None
    assert len(kept) == len(kept_ref) == len(ref.events) > 3
    for i, (a, b) in enumerate(zip(kept, kept_ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"prune {i} (step {ref.events[i]['step']})")
    assert r.events == ref.events
    assert (r.visible_kv == ref.visible_kv).all()
    np.testing.assert_allclose(r.nll, ref.nll, atol=2e-6, rtol=0)
    np.testing.assert_allclose(r.entropy, ref.entropy, atol=1e-4, rtol=0)
    assert g.memory["kv_capacity_slots"] == max(ref.visible_kv) + 1
    if layout == "static":  # compacted: the kept tokens hold the first slots, in cache order
        C = g.s.capacity
        n_valid = int(g.valid[:C].sum())
        assert g.valid[:n_valid].all() and (np.diff(g.scored.slot_pos[:n_valid].numpy()) > 0).all()
    return np.abs(r.nll - ref.nll).max()


def test_graph_scored_static_layout_falls_back(caplog):
    """The static layout keeps StreamingLLM positions only: tova / h2o / snapkv (original positions) run eager."""
    ids = text_ids(KIND, n=60)
    args = ("n_sink=4", "window=24", "policy=tova", "compress_every=4")
    cfg, g = _graph("static", *args, n=len(ids))
    with caplog.at_level("WARNING", logger="streamkv"):
        g.run(ids, 0)
    assert g.backend_used == "eager (fallback from cudagraph)"
    assert "static layout keeps StreamingLLM positions only" in caplog.text


def _eager_and_ring_graph(caplog, n: int, *args):
    """The eager run and the ring graph run (its warnings captured) of one config on n tokens:
    (eager result, GraphEvaluator, graph result)."""
    ids = text_ids(KIND, n=n)
    cfg, ev = _evaluator(*args, n=len(ids))
    ref = ev.run(ids, 0)
    cfg, g = _graph("ring", *args, n=len(ids))
    with caplog.at_level("WARNING", logger="streamkv"):
        r = g.run(ids, 0)
    return ref, g, r


def test_graph_scored_shift_ring_layout_falls_back(caplog):
    """positions=shift in the ring layout (keys stored at their true positions) runs eager, saying why."""
    ref, g, r = _eager_and_ring_graph(caplog, 60, "n_sink=4", "window=24", "policy=h2o", "compress_every=4",
                                      "policy.positions=shift")
    assert g.backend_used == "eager (fallback from cudagraph)"
    assert "ring layout keeps true positions" in caplog.text and "use cache=static" in caplog.text
    np.testing.assert_allclose(r.nll, ref.nll, atol=1e-5, rtol=0)  # the eager path over the ring manager


@pytest.mark.parametrize("policy", [("policy=adaptive", "policy.mode=entropy", "policy.extra_slack=6"),
                                    ("policy=refresh", "policy.refresh_budget=4", "policy.refresh_select=entropy",
                                     "compress_every=8")])
def test_data_dependent_policy_falls_back_to_eager(policy, caplog):
    ref, g, r = _eager_and_ring_graph(caplog, 120, "n_sink=4", "window=24", *policy)
    assert g.backend_used == "eager (fallback from cudagraph)"
    assert "cannot be precomputed" in caplog.text and "cache=static runs it online" in caplog.text
    np.testing.assert_array_equal(r.nll, ref.nll)


# the tiny model's predictive entropy spans ~4.97-5.29 nats on this text: thresholds inside it make the
# allowed slack move from step to step (prunes of 1-4 tokens, and 12 after a 40-token prefill)
ENTROPY_POLICIES = {
    "adaptive_entropy": ("policy=adaptive", "policy.mode=entropy", "policy.extra_slack=6",
                         "policy.entropy_low=5.05", "policy.entropy_high=5.25"),
    "refresh_entropy": ("policy=refresh", "policy.refresh_budget=4", "policy.refresh_select=entropy",
                        "compress_every=8"),
}


@pytest.mark.parametrize("prefill", [0, 40])
@pytest.mark.parametrize("policy", list(ENTROPY_POLICIES))
def test_entropy_driven_policy_runs_online_in_the_static_layout(policy, prefill):
    """Entropy-driven policies on cache=static: the step's write slot comes from the device's valid mask,
    the host decides after each step from the entropy the step wrote, and a prune uploads the compaction.
    Same events, visible lengths and per-token NLL as concat x eager (float32, un-captured step)."""
    ids = text_ids(KIND, n=160)
    args = ("n_sink=4", "window=24", f"prefill_tokens={prefill}", *ENTROPY_POLICIES[policy])
    cfg, ev = _evaluator(*args, n=len(ids))
    ref = ev.run(ids, cfg.prefill_tokens)
    cfg, g = _graph("static", *args, n=len(ids))
    for _ in range(2):  # a second run starts from a clean state (policy, bookkeeping, events)
        r = g.run(ids, cfg.prefill_tokens)
        assert g.backend_used == "cudagraph (online)" and g.fallback_reason is None
        if policy == "adaptive_entropy":
            assert len({e["dropped"] for e in ref.events}) > 1  # the entropy really moved the prunes
        assert r.events == ref.events
        assert (r.visible_kv == ref.visible_kv).all()
        np.testing.assert_allclose(r.nll, ref.nll, atol=2e-6, rtol=0)
        np.testing.assert_allclose(r.entropy, ref.entropy, atol=1e-4, rtol=0)
    assert g.memory["kv_capacity_slots"] == max(g.policy.capacity, prefill)


# ---------------------------------------------------------------- our Triton kernels (interpreter)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_interpreter():
    """float32 only: the interpreter's bf16 tl.dot is wrong (triton 3.6); bf16 is checked on the GPU."""
    script = textwrap.dedent("""
        import torch
        from streamkv.backends.triton_kernels import DecodeAttention, kv_update
        from streamkv.backends.functional import rope
        from attention_ref import attention_case, rope_tables as tables
        torch.manual_seed(0)
        for Hq, Hkv, D, C, rot in [(9, 3, 64, 70, False), (4, 4, 32, 40, True), (8, 2, 64, 33, False)]:
            q, k, v, valid, cos, sin, ref = attention_case(Hq, Hkv, D, D, C, rot)
            att = DecodeAttention(Hq, Hkv, D, C, torch.device("cpu"), torch.float32, rotate_k=rot, block_n=16, n_sm=4)
            assert att.ns > 1
            out = att(q, k, v, valid, D ** -0.5, cos if rot else None, sin if rot else None)
            assert ((out - ref).norm() / ref.norm()) < 1e-5, (Hq, Hkv, D, C, rot)
        Hq, Hkv, D, C, n, F, S = 6, 2, 32, 10, 20, 2, 3
        qkv = torch.randn((Hq + 2 * Hkv) * D)
        K = torch.zeros(Hkv, C + 1, D); V = torch.zeros(Hkv, C + 1, D); side = torch.randn(Hkv, S + 1, D)
        cos, sin = tables(100, D)
        step = torch.tensor([5]); qpos = torch.arange(n) * 3; ws = torch.arange(n) % C; sw = torch.arange(n) % (S + 1)
        fslot = torch.randint(0, C, (n, F)); fsrc = torch.randint(0, S, (n, F)); fpos = torch.randint(0, 90, (n, F))
        fslot[5] = torch.tensor([7, 9]); fsrc[5] = torch.tensor([0, 2]); sw[5] = 1
        side0 = side.clone(); qo = torch.empty(Hq, D)
        kv_update(qkv, qo, K, V, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos, n_heads=Hq, n_kv=Hkv,
                  rotate_k=True, has_side=True)
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D]); q, k, v = q.view(Hq, D), k.view(Hkv, D), v.view(Hkv, D)
        p = int(qpos[5])
        assert torch.allclose(qo, rope(q, cos[p], sin[p]), atol=1e-6)
        assert torch.allclose(K[:, ws[5]], rope(k, cos[p], sin[p]), atol=1e-6)
        assert torch.equal(V[:, ws[5]], v) and torch.equal(side[:, 1], k)
        for f in range(F):
            src = side0[:, fsrc[5, f]]
            assert torch.allclose(K[:, fslot[5, f]], rope(src, cos[fpos[5, f]], sin[fpos[5, f]]), atol=1e-6)
        print("ok")
    """)
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gemv_configs_from_a_gemv_bench_file(tmp_path, monkeypatch):
    """`bench --gemv-configs`: only configs that beat the heuristic's are added, keyed by (N, K)."""
    from streamkv.backends import gemv_kernels as gk

    monkeypatch.setattr(gk, "MEASURED", dict(gk.MEASURED))
    rows = [{"N": 12288, "K": 4096, "best_cfg": [8, 512, 4], "best_us": 40.0, "ours_us": 49.0},
            {"N": 4096, "K": 11008, "best_cfg": [4, 256, 2], "best_us": 30.0, "ours_us": 30.0}]  # no gain
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"meta": {}, "rows": rows}))
    assert gk.load_measured(f) == {(12288, 4096): (8, 512, 4)}
    assert gk.gemv_config(12288, 4096) == (8, 512, 4)
    assert (4096, 11008) not in gk.MEASURED


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gemv_kernels_in_interpreter():
    """add_rmsnorm_gemv and swiglu_gemv (streamkv/backends/gemv_kernels.py) against float64 references:
    float32 (to 1e-6 relative), bf16 against the unfused path's roundings emulated in float64 (loosely:
    the interpreter truncates bf16 casts; the GPU check is scripts/gemv_bench.py); small odd shapes (masked rows and K tail) and SmolLM2-135M's (the
    shape heuristic's own config on qkv; larger blocks elsewhere, for the interpreter's speed)."""
    script = textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from streamkv.backends.gemv_kernels import MEASURED, add_rmsnorm_gemv, gemv_config, gemv_unroll, swiglu_gemv
        torch.manual_seed(0)
        bf = torch.bfloat16
        def rnd(t, dt):  # round a float64 tensor as dtype dt would, keep float64
            return t.to(dt).double()
        def ref_norm(x, r, g, w, eps, b, dt, exact=True):
            s = x.double().view(-1) + (r.double().view(-1) if r is not None else 0)
            s = rnd(s, dt)
            rstd = torch.rsqrt(s.pow(2).mean() + eps)
            h = rnd(rnd(s * rstd, dt) * g.double(), dt) if exact else s * rstd * g.double()
            y = w.double() @ h
            return (y + b.double() if b is not None else y), s
        def ref_swiglu(gu, w, dt):
            g, u = gu.double().view(-1).chunk(2)
            return w.double() @ rnd(rnd(F.silu(g), dt) * u, dt)
        def check(y, ref, dt, what):
            y = y.double().view(-1)
            if dt == torch.float32:
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-6, (what, err)
            else:  # the interpreter truncates float32 -> bf16 casts (triton 3.9; the GPU rounds to nearest):
                # a few bf16 roundings of the output and of the activation's elements
                bad = (y - ref).abs() > ref.abs() * 2.0 ** -7 + 1e-2 * ref.abs().max()
                assert not bad.any(), (what, (y - ref).abs().max().item())
        cases = [(37, 100, None), (64, 96, (4, 32, 1)), (50, 80, (16, 64, 2)),  # masked rows / K tail
                 (9, 1100, (8, 32, 1)),  # K chunks: runtime loop of unrolled groups + remainder + tail
                 (960, 576, gemv_config(960, 576)), (3072, 576, (64, 64, 4)), (576, 576, (32, 64, 2))]
        for dt in (torch.float32, bf):
            for N, K, cfg in cases:
                if dt == bf and N > 1000:
                    continue
                x = torch.randn(1, K, dtype=dt); r = torch.randn(1, K, dtype=dt); g = (torch.rand(K) + 0.5).to(dt)
                w = (torch.randn(N, K) / K ** 0.5).to(dt); b = torch.randn(N).to(dt)
                for exact in (True, False):
                    for rr, bb in [(r, b), (None, None)][:1 if N > 500 else 2]:
                        y, s = add_rmsnorm_gemv(x, rr, g, w, 1e-5, bb, exact=exact, config=cfg)
                        yr, sr = ref_norm(x, rr, g, w, 1e-5, bb, dt, exact)
                        check(y, yr, dt, ("norm", dt, N, K, exact, rr is not None))
                        assert y.shape == (1, N) and y.dtype == dt
                        ds = (s.double().view(-1) - sr).abs().max().item()
                        assert ds <= (0 if dt == torch.float32 else 2.0 ** -7 * sr.abs().max().item()), ("residual", dt, ds)
                        assert (s is x) == (rr is None)
                y, s = add_rmsnorm_gemv(x, r, g, w, 1e-5, write_residual=False, config=cfg)
                assert s is None
            for N, I, cfg in [(40, 72, None), (33, 128, (8, 64, 2)), (9, 1100, (8, 32, 1)), (576, 1536, (32, 256, 4))]:
                if dt == bf and N > 100:
                    continue
                gu = torch.randn(1, 2 * I, dtype=dt); w = (torch.randn(N, I) / I ** 0.5).to(dt)
                check(swiglu_gemv(gu, w, config=cfg), ref_swiglu(gu, w, dt), dt, ("swiglu", dt, N, I))
        # the measured table wins for SmolLM2's shapes; other shapes get the heuristic
        assert gemv_config(960, 576, 132) == MEASURED[(960, 576)] == (4, 128, 2)
        assert gemv_config(1000, 576, 132) == (4, 64, 1) and gemv_config(4096, 11008, 132)[1] == 256
        assert gemv_unroll(1100, 8, 32, 1) == 8 and gemv_unroll(576, 4, 64, 1) == 9  # SmolLM2: fully unrolled
        print("ok")
    """)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ---------------------------------------------------------------- benchmark plumbing (not timed)


def test_bench_pieces_run_on_cpu():
    from streamkv import bench

    dev = torch.device("cpu")
    model, _, _ = bench.load_bench_model("tiny", dev, torch.float32)
    ids = bench.bench_ids(100, model.config.vocab_size, load(KIND).tokenizer)
    r = bench.hf_seed_style(model, ids, 40, 20, 4, 16, 8)
    assert r["decode_tokens"] == 20 and np.isfinite(r["nll"]).all()
    assert 4 + 16 <= r["visible_kv_mean"] <= 4 + 16 + 8
    total, read = bench.weight_bytes(model)
    assert read < total  # the untied embedding table is not read per token
    assert bench.copy_bandwidth(dev, nbytes=1 << 20, reps=2) > 0
    row = bench.Row(model="tiny", label="x", cache="ring", backend="cudagraph", policy="streaming", R=32,
                    tpot_ms=1.0, roofline_ms=0.5, roofline_frac=0.5)
    md = bench.markdown([row], {"device": "cpu", "copy_bw_gbs": 1.0, "n_sink": 4, "window": 16})
    assert "| x | streaming | 32 | – | 1.000 |" in md, md  # prunes not counted: shown as –
    # our paths count the prunes of the timed decode (not the prefill's): strict streaming prunes every
    # step once the prefill has filled the window
    case = bench.Case(label="ring x eager", kind="ours", cache="ring", backend="eager", R=1)
    res = bench.run_ours(case, model, load(KIND).tokenizer, ids, 40, dev, torch.float32, 4, 16)
    assert res["decode_tokens"] == 59 and res["n_prunes"] == 59


def test_bench_seed_style_case_runs_its_warm_cycle(tmp_path, monkeypatch):
    """The seed-style case first runs one discarded pass over a whole prune cycle (R steps; cuDNN plans per key
    length), so the text must be long enough for it even when the timed decode is shorter than R."""
    from streamkv import bench
    from streamkv.bench import baselines

    calls = []
    seed_style = baselines.hf_seed_style
    monkeypatch.setattr(baselines, "hf_seed_style", lambda *a, **k: calls.append(a[3]) or seed_style(*a, **k))
    bench.main(["--smoke", "--only", "seed-style", "--decode-slow", "8", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"], rows
    assert calls == [32, 8]  # the warm pass over R = 32 steps, then the 8 timed steps


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_graph_step_in_interpreter():
    """cudagraph_fused's step (our Triton kernels for RoPE + slot write + sink re-rotation and decode
    attention) un-captured, float32, through Triton's interpreter; liger's kernels (which the
    interpreter cannot run) replaced by their PyTorch arithmetic."""
    script = textwrap.dedent("""
        import sys, types
        import numpy as np, torch, torch.nn.functional as F
        sys.path.insert(0, "tests")
        from streamkv.backends import functional as fn
        class RMS:
            apply = staticmethod(lambda x, w, eps, off, mode, ip: fn.rms_norm(x, w, eps))
        class AddRMS:
            @staticmethod
            def apply(x, r, w, eps, off, mode, ip):
                s = x + r
                return fn.rms_norm(s, w, eps), s
        class SwiGLU:
            @staticmethod
            def apply(y):
                g, u = y.chunk(2, -1)
                return F.silu(g) * u
        for mod, name, obj in [("liger_kernel.ops.rms_norm", "LigerRMSNormFunction", RMS),
                               ("liger_kernel.ops.fused_add_rms_norm", "LigerFusedAddRMSNormFunction", AddRMS),
                               ("liger_kernel.ops.swiglu", "LigerFusedGateUpSiLUMulFunction", SwiGLU)]:
            m = types.ModuleType(mod); setattr(m, name, obj); sys.modules[mod] = m
        torch.set_num_threads(1)
        from conftest import compose, load, text_ids
        from streamkv.runner import make_evaluator
        from streamkv.backends.graph import GraphEvaluator
        ids = text_ids("tiny_llama", n=48)
        ov = ("policy=refresh", "policy.refresh_budget=4", "n_sink=4", "window=12", "compress_every=4",
              "prefill_tokens=20")
        def ev():
            cfg = compose("model=tiny_llama", "progress=false", *ov)
            return make_evaluator(cfg, load("tiny_llama").model, len(ids), torch.device("cpu"))
        ref = ev().run(ids, 20)
        import streamkv.backends.gemv_kernels as gk
        from streamkv.backends.graph import GemvOptions
        gk.gemv_config = lambda N, K, n_sm=132: (256, 64, 4)  # one program per GEMV: the interpreter's speed
        for layout in ("ring", "static"):
            r = GraphEvaluator(ev(), layout, fused=True, capture=False).run(ids, 20)
            assert np.abs(r.nll - ref.nll).max() < 1e-5, layout
            assert r.events == ref.events
            # the fused-prologue GEMVs (gemv_kernels.py): same NLL with the flag on as off (also with the
            # LM head unfused, and with only the small GEMVs fused: the size limit's fallback)
            for lm_head, limit, exact in [(True, None, True), (False, None, True), (True, 40000, True),
                                          (True, None, False)]:
                g = GraphEvaluator(ev(), layout, fused=True, capture=False, fused_gemv=True,
                                   gemv=GemvOptions(lm_head=lm_head, max_bytes=limit, exact=exact))
                assert g.fused_gemv and g.backend_name == "cudagraph_fused_gemv"
                rg = g.run(ids, 20)
                assert np.abs(rg.nll - r.nll).max() < 1e-5, (layout, lm_head, limit, exact, np.abs(rg.nll - r.nll).max())
                assert np.abs(rg.entropy - r.entropy).max() < 1e-4, (layout, lm_head, limit, exact)
                assert rg.events == ref.events
        assert not GraphEvaluator(ev(), "ring", fused=True, capture=False).fused_gemv  # default: off
        # score-based policies: the device scores from kv_update's rotated query and the slot keys
        for ov in [("policy=h2o", "n_sink=4", "window=12", "compress_every=4", "prefill_tokens=20"),
                   ("policy=snapkv", "policy.obs_window=4", "n_sink=4", "window=12", "compress_every=4",
                    "prefill_tokens=20")]:
            ref = ev().run(ids, 20)
            r = GraphEvaluator(ev(), "ring", fused=True, capture=False).run(ids, 20)
            assert np.abs(r.nll - ref.nll).max() < 1e-5, ov
            assert r.events == ref.events
            rg = GraphEvaluator(ev(), "ring", fused=True, capture=False, fused_gemv=True).run(ids, 20)
            assert np.abs(rg.nll - r.nll).max() < 1e-5 and rg.events == ref.events, ("gemv", ov)
        # an entropy-driven policy, online in the static layout (the write slot from the valid mask)
        ov = ("policy=adaptive", "policy.mode=entropy", "policy.extra_slack=6", "policy.entropy_low=5.05",
              "policy.entropy_high=5.25", "n_sink=4", "window=12", "prefill_tokens=20")
        ref = ev().run(ids, 20)
        assert len(ref.events) > 3
        for gemv in (False, True):
            g = GraphEvaluator(ev(), "static", fused=True, capture=False, fused_gemv=gemv)
            r = g.run(ids, 20)
            assert g.backend_used.endswith("(online)"), g.backend_used
            assert np.abs(r.nll - ref.nll).max() < 1e-5 and r.events == ref.events, ("online", gemv)
        print("ok")
    """)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_step_ops_counts_the_scoring_on_prune_steps_only():
    """scripts/step_ops.py on the tiny model: SnapKV's steps without a prune all dispatch the same number of
    operators, and the prune steps more (the scoring runs only there)."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "scripts/step_ops.py", "model=tiny_llama", "policy=snapkv", "window=24",
                        "compress_every=8"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    found = dict(re.findall(r"steps (with|without) a prune: \d+, operators per step (\S+)", r.stdout))
    assert set(found) == {"with", "without"} and found["without"].isdigit() and found["with"].isdigit(), r.stdout
    assert int(found["with"]) > int(found["without"])
