"""The refresh policy's attention-driven selection (refresh_select=attention) and score-kept region
(refresh_keep=score): the host path against an independent numpy computation of SnapKV's score on the
tiny model, the invariants of the cache, the graph path (ring and static, un-captured, float32) against
concat x eager token for token, and the config checks. Tiny random Llama on the offline wiki text."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import compose, load, text_ids

KIND = "tiny_llama"
S, W, R = 4, 24, 8
BASE = ("policy=refresh", "policy.refresh_select=attention", f"n_sink={S}", f"window={W}", f"compress_every={R}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _evaluator(*overrides, n):
    from streamkv.runner import make_evaluator

    cfg = compose(f"model={KIND}", "progress=false", *overrides)
    return cfg, make_evaluator(cfg, load(KIND).model, n, torch.device("cpu"), load(KIND).tokenizer)


# ---------------------------------------------------------------- the host path vs a hand computation


def _pool_avg(x: np.ndarray, k: int) -> np.ndarray:
    """Average pooling along the last axis, stride 1, zero padding k // 2, divided by k."""
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(k // 2, k // 2)])
    return np.stack([pad[..., i:i + x.shape[-1]] for i in range(k)]).sum(0) / k


def _snapkv_by_hand(qs: list, ks: list, token_pos: np.ndarray, q_pos: np.ndarray, kernel: int) -> np.ndarray:
    """Score of each cached key, from the recorded queries and keys of every layer: per head, softmax over
    the keys the query may see (text position <= its own), mean over the w queries, the observation window
    cut off, average pooling, mean over the heads, summed over the layers; 0 for the window."""
    L, w = len(token_pos), len(q_pos)
    total = np.zeros(L)
    for q, k in zip(qs, ks):  # q [H, w, D], k [Hkv, L, D] (float64)
        H, Hkv = q.shape[0], k.shape[0]
        per_head = []
        for h in range(H):
            logits = q[h] @ k[h // (H // Hkv)].T / np.sqrt(q.shape[-1])  # [w, L]
            logits = np.where(token_pos[None, :] <= q_pos[:, None], logits, -np.inf)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            per_head.append(_pool_avg(p.mean(0)[:L - w][None], kernel)[0])
        total[:L - w] += np.mean(per_head, axis=0)
    return total


@pytest.mark.parametrize("keep, M", [("fifo", 3), ("score", 3), ("fifo", 8)])
def test_host_selection_is_the_top_snapkv_scores_of_the_segment(keep, M):
    """At every prune, the tokens that join the refresh region are the top M of the evicted segment by a
    SnapKV score computed here from the recorded queries and keys; the region then keeps its newest B
    (fifo) or its best-scored B under the same prune's scores (score). obs_window <= R: the window's
    queries all come after the previous prune, so their positions did not move (no re-rotation here)."""
    B, w, kernel = 8, 4, 5
    ids = text_ids(KIND, n=150)
    cfg, ev = _evaluator(*BASE, f"policy.refresh_budget={B}", f"policy.refresh_per_prune={M}",
                         f"policy.refresh_keep={keep}", f"policy.obs_window={w}", f"policy.kernel_size={kernel}",
                         n=len(ids))
    pol, dec, cache = ev.policy, ev.decoder, ev.cache
    seen: dict = {"q": {}, "k": {}, "qpos": []}
    observer = dec.attention_observer

    def spy_observer(layer, q, k, mask):
        seen["q"].setdefault(layer, []).append(q[0, :, -1].double().numpy())  # T = 1: no prefill here
        seen["k"][layer] = k[0].double().numpy()
        if layer == 0:
            seen["qpos"].append(int(cache.token_pos[-1]))
        observer(layer, q, k, mask)

    dec.attention_observer = spy_observer
    decide, checked = pol.decide, []

    def spy_decide(view):
        pos, r = view.token_pos.copy(), pol.n_refresh
        d = decide(view)
        if d is None:
            return d
        n_layers = len(seen["k"])
        qs = [np.stack(seen["q"][i][-w:], axis=1) for i in range(n_layers)]
        score = _snapkv_by_hand(qs, [seen["k"][i] for i in range(n_layers)], pos,
                                np.array(seen["qpos"][-w:]), kernel)
        body = len(pos) - S - r
        n_drop = body - W
        seg = np.arange(S + r, S + r + n_drop)
        order = sorted(seg.tolist(), key=lambda c: (-score[c], c))  # best first, ties: the older
        picks = sorted(order[:M])
        cand = list(range(S, S + r)) + picks
        if keep == "fifo":
            region = cand[-B:]
        else:
            region = sorted(sorted(cand, key=lambda c: (-score[c], c))[:B])
        expected = list(range(S)) + region + list(range(S + r + n_drop, len(pos)))
        assert d.keep.tolist() == expected, f"step {view.step}"
        assert np.ptp(score[seg]) > 1e-4  # distinct scores: the ranking is not decided by ties
        checked.append(view.step)
        return d

    pol.decide = spy_decide
    ev.run(ids, 0)
    assert len(checked) >= 10


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("extra", [
    ("policy.refresh_budget=6",),
    ("policy.refresh_budget=6", "policy.refresh_keep=score", "policy.refresh_per_prune=2"),
    ("policy.refresh_budget=5", "policy.refresh_keep=score", "policy.max_drop=3"),
], ids=["fifo", "score", "score+max_drop"])
def test_invariants(extra):
    cfg, ev = _evaluator(*BASE, *extra, n=400)
    p = cfg.policy
    B, M = p.refresh_budget, p.refresh_per_prune or p.refresh_budget
    ids = text_ids(KIND, n=400)
    evict, seen = ev.cache.evict, {"r": 0}

    def spy(keep):
        evict(keep)
        pos, r = ev.cache.token_pos, ev.policy.n_refresh
        assert list(pos[:S]) == list(range(S)), "a sink was evicted"
        assert (np.diff(pos) > 0).all(), "cache order must stay text order"
        assert 0 <= r <= B, f"refresh region {r} > budget {B}"
        body = pos[S + r:]
        assert (np.diff(body) == 1).all() and body[-1] == ev.cache.next_pos - 1, "the window must be the newest"
        assert len(body) >= W
        seen["r"] = max(seen["r"], r)

    ev.cache.evict = spy
    res = ev.run(ids, cfg.prefill_tokens)
    assert seen["r"] == B
    steady = res.visible_kv[res.events[0]["step"] + 1:]
    assert steady.min() >= S + W and steady.max() <= S + B + W + R - 1
    assert res.visible_kv.max() <= ev.policy.capacity - 1
    assert all(0 < e["refreshed"] <= M for e in res.events)


def test_score_keep_holds_tokens_fifo_would_push_out():
    """refresh_keep=score differs from fifo: some token stays in the region longer than B / M prunes."""
    ids = text_ids(KIND, n=300)
    life = {}
    for keep in ("fifo", "score"):
        cfg, ev = _evaluator(*BASE, "policy.refresh_budget=4", "policy.refresh_per_prune=2",
                             f"policy.refresh_keep={keep}", n=len(ids))
        evict, held = ev.cache.evict, {}

        def spy(k, ev=ev, evict=evict, held=held):
            evict(k)
            for j in ev.cache.token_pos[S:S + ev.policy.n_refresh].tolist():
                held[j] = held.get(j, 0) + 1

        ev.cache.evict = spy
        ev.run(ids, 0)
        life[keep] = max(held.values())
    assert life["fifo"] == 2 and life["score"] > 2  # fifo: B / M = 2 prunes in the region


# ---------------------------------------------------------------- scored only when a prune may follow


def test_host_scores_only_on_prune_steps():
    from streamkv.policies.snapkv import QueryWindow

    ids = text_ids(KIND, n=120)
    cfg, ev = _evaluator(*BASE, "policy.refresh_budget=4", n=len(ids))
    calls = []
    observe = QueryWindow.observe

    def counting(self, layer, q, k, score):
        calls.append(score)
        return observe(self, layer, q, k, score)

    QueryWindow.observe = counting
    try:
        res = ev.run(ids, 0)
    finally:
        QueryWindow.observe = observe
    n_layers = ev.decoder.shape.n_layers
    assert sum(calls) == n_layers * len(res.events) and len(calls) == n_layers * (len(ids) - 1)


# ---------------------------------------------------------------- the graph path == concat x eager


GRAPH = {
    "fifo": ("policy.refresh_budget=8", "policy.refresh_per_prune=4"),
    "score": ("policy.refresh_budget=8", "policy.refresh_per_prune=3", "policy.refresh_keep=score",
              "policy.pooling=max", "policy.kernel_size=3", "policy.obs_window=5"),
    "score_prefill_max_drop": ("policy.refresh_budget=6", "policy.refresh_keep=score", "policy.max_drop=3",
                               "prefill_tokens=64"),
}


@pytest.mark.parametrize("layout", ["ring", "static"])
@pytest.mark.parametrize("case", list(GRAPH))
def test_graph_matches_concat_eager(case, layout):
    """The graph step (un-captured, float32) keeps the same tokens at every prune as concat x eager (the
    device's topk over the device's SnapKV scores), with the same events, visible lengths and per-token NLL."""
    from test_backends import _scored_matches_concat_eager

    worst = _scored_matches_concat_eager(layout, (*BASE, *GRAPH[case]))
    assert worst <= 2e-6


def test_graph_acceptance_shape_matches_concat_eager():
    """The coordinator's acceptance run in-process: budget 8, R = 8, window 32, 300 tokens, ring, un-captured:
    mean |dNLL| <= 1e-4 against concat x eager; scored only on the prune steps."""
    from streamkv.backends.graph import GraphEvaluator, ScoredEviction

    args = ("policy=refresh", "policy.refresh_select=attention", "policy.refresh_budget=8", "compress_every=8",
            "window=32")
    ids = text_ids(KIND, n=300)
    cfg, ev = _evaluator(*args, n=len(ids))
    ref = ev.run(ids, 0)
    cfg, ev = _evaluator(*args, n=len(ids))
    g = GraphEvaluator(ev, "ring", capture=False, tokenizer=load(KIND).tokenizer)
    calls = []
    observe = ScoredEviction.observe
    ScoredEviction.observe = lambda self, i, *a: calls.append(i) or observe(self, i, *a)
    try:
        r = g.run(ids, 0)
    finally:
        ScoredEviction.observe = observe
    assert g.backend_used == "cudagraph" and g.fallback_reason is None
    assert np.abs(r.nll - ref.nll).mean() <= 1e-4 and r.events == ref.events
    assert len(calls) == len(g.w.layers) * len(ref.events)


def test_graph_entropy_trigger_falls_back_to_eager(caplog):
    """adaptive mode=entropy decides its prunes from the entropy, and the attention selection needs the
    scores on the host: no schedule, the eager path with a warning."""
    from streamkv.backends.graph import GraphEvaluator

    args = ("policy=adaptive", "policy.mode=entropy", "policy.extra_slack=6", "policy.refresh_budget=4",
            "policy.refresh_select=attention", f"n_sink={S}", f"window={W}")
    ids = text_ids(KIND, n=60)
    for layout in ("ring", "static"):
        cfg, ev = _evaluator(*args, n=len(ids))
        ref = ev.run(ids, 0)
        cfg, ev = _evaluator(*args, n=len(ids))
        g = GraphEvaluator(ev, layout, capture=False, tokenizer=load(KIND).tokenizer)
        with caplog.at_level(logging.WARNING, logger="streamkv"):
            r = g.run(ids, 0)
        assert g.backend_used.startswith("eager (fallback") and "attention" in g.fallback_reason
        np.testing.assert_allclose(r.nll, ref.nll, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["policy=refresh", "policy.refresh_keep=lru"], "policy.refresh_keep: 'lru' is not one of fifo, score"),
    (["policy=refresh", "policy.refresh_keep=score"], "policy.refresh_keep: only used with policy.refresh_select=attention"),
    (["policy=refresh", "policy.obs_window=4"], "policy.obs_window: only used with policy.refresh_select=attention"),
    (["policy=refresh", "policy.refresh_select=attention", "policy.obs_window=100", "window=64"],
     "policy.obs_window: must be between 1 and window=64"),
    (["policy=refresh", "policy.refresh_select=attention", "policy.kernel_size=2"], "policy.kernel_size: must be an odd"),
    (["policy=max_drop", "policy.refresh_select=attention", "policy.pooling=max"],
     "has no effect while policy.refresh_budget is off"),
])
def test_config_errors(overrides, message):
    from streamkv.cli import precheck
    from streamkv.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        precheck(["model=tiny_llama", *overrides])
    assert "\n" not in str(exc.value) and message in str(exc.value), str(exc.value)


def test_good_compositions():
    from streamkv.cli import precheck

    precheck(["model=tiny_llama", "policy=refresh", "policy.refresh_select=attention", "policy.refresh_keep=score",
              "policy.obs_window=16", "policy.kernel_size=7", "policy.pooling=max"])
    precheck(["model=tiny_llama", "policy=max_drop", "policy.refresh_budget=16", "policy.refresh_select=attention"])
