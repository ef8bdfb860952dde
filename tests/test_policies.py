"""Eviction policies: equivalences token for token, event-log invariants for every policy,
hand-made attention patterns for the score-based baselines, config validation, and the CLI sweep.
Tiny random Llama on the offline wiki text (CPU, float32)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import compose, load, run_cli, text_ids

S, W, R = 4, 32, 8
N = 600  # tokens of the invariant runs
NEQ = 300  # tokens of the equivalence runs


def run(*overrides: str, n: int = N, spy=None):
    """One in-process run; returns (EvalResult, policy). spy(cache, policy) runs after each prune."""
    from streamkv.runner import make_evaluator

    ids = text_ids("tiny_llama", n=n)
    cfg = compose("model=tiny_llama", "progress=false", *overrides)
    m = load("tiny_llama")
    ev = make_evaluator(cfg, m.model, len(ids), torch.device("cpu"), m.tokenizer)
    if spy is not None:
        evict = ev.cache.evict

        def spying_evict(keep):
            evict(keep)
            spy(ev.cache, ev.policy)

        ev.cache.evict = spying_evict
    return ev.run(ids, cfg.prefill_tokens), ev.policy


_BASE: dict = {}


def streaming(n: int, r: int = R):
    key = (n, r)
    if key not in _BASE:
        _BASE[key] = run(f"n_sink={S}", f"window={W}", f"compress_every={r}", n=n)[0]
    return _BASE[key]


# ---------------------------------------------------------------- equivalences (token for token)


@pytest.mark.parametrize("overrides", [
    ["policy=max_drop", f"policy.max_drop={R}"],
    ["policy=max_drop", "policy.max_drop=1000"],
    ["policy=overlap", "policy.overlap=0"],
    ["policy=refresh", "policy.refresh_budget=0"],
    ["policy=refresh", "policy.refresh_budget=0", "policy.refresh_select=structural"],
    ["policy=max_drop", f"policy.max_drop={R + 3}", "policy.overlap=0"],  # composed neutral pieces
], ids=["max_drop=R", "max_drop>R", "overlap=0", "refresh_budget=0", "refresh_budget=0-structural",
        "max_drop+overlap0"])
def test_neutral_knob_equals_streaming(overrides):
    base = streaming(NEQ)
    r, _ = run(f"n_sink={S}", f"window={W}", f"compress_every={R}", *overrides, n=NEQ)
    np.testing.assert_array_equal(r.nll, base.nll)
    np.testing.assert_array_equal(r.visible_kv, base.visible_kv)
    assert [(e["step"], e["dropped"]) for e in r.events] == [(e["step"], e["dropped"]) for e in base.events]


def test_adaptive_slack_equals_streaming_with_period_slack_plus_one():
    base = streaming(NEQ)
    r, _ = run(f"n_sink={S}", f"window={W}", "policy=adaptive", "policy.mode=slack", f"policy.extra_slack={R - 1}",
               n=NEQ)
    np.testing.assert_array_equal(r.nll, base.nll)


@pytest.mark.parametrize("overrides", [
    ["policy=max_drop", "policy.max_drop=3"],
    ["policy=overlap", "policy.overlap=4"],
    ["policy=refresh", "policy.refresh_budget=8"],
], ids=["max_drop", "overlap", "refresh"])
def test_active_knob_changes_the_result(overrides):
    """The equivalences above would be vacuous if the knobs did nothing."""
    base = streaming(NEQ)
    r, _ = run(f"n_sink={S}", f"window={W}", f"compress_every={R}", *overrides, n=NEQ)
    assert np.abs(r.nll - base.nll).max() > 1e-4


# ---------------------------------------------------------------- invariants from the event log

LAZY_CASES = {
    "streaming": [],
    "max_drop": ["policy=max_drop", "policy.max_drop=3"],
    "overlap": ["policy=overlap", "policy.overlap=5"],
    "refresh-uniform": ["policy=refresh", "policy.refresh_budget=12", "policy.refresh_per_prune=5"],
    "refresh-structural": ["policy=refresh", "policy.refresh_budget=12", "policy.refresh_select=structural"],
    "refresh-entropy": ["policy=refresh", "policy.refresh_budget=6", "policy.refresh_per_prune=4",
                        "policy.refresh_select=entropy"],
    "max_drop+refresh": ["policy=max_drop", "policy.max_drop=3", "policy.refresh_budget=10",
                         "policy.refresh_per_prune=2"],
    "overlap+refresh": ["policy=overlap", "policy.overlap=3", "policy.refresh_budget=8"],
    "adaptive-slack": ["policy=adaptive", "policy.extra_slack=10", "compress_every=1"],
    "adaptive-entropy": ["policy=adaptive", "policy.mode=entropy", "policy.extra_slack=12", "policy.entropy_low=5.17",
                         "policy.entropy_high=5.19", "policy.entropy_window=4", "compress_every=1"],
    "adaptive+max_drop": ["policy=adaptive", "policy.extra_slack=12", "policy.max_drop=4", "compress_every=1"],
    "adaptive+overlap+refresh": ["policy=adaptive", "policy.extra_slack=9", "policy.overlap=4",
                                 "policy.refresh_budget=5", "compress_every=1"],
}


def _knobs(overrides):
    from streamkv.policies import POLICIES

    cfg = compose("model=tiny_llama", *overrides)
    p = POLICIES[cfg.policy.name].settings(cfg.policy)  # every lazy knob (neutral where the preset takes none)
    slack = cfg.compress_every - 1 if p.mode is None else p.extra_slack
    return cfg, p, slack


def _with_period(overrides):
    """S, W and the default period R unless the case sets compress_every itself."""
    has_r = any(o.startswith("compress_every=") for o in overrides)
    return [f"n_sink={S}", f"window={W}", *([] if has_r else [f"compress_every={R}"]), *overrides]


@pytest.mark.parametrize("case", list(LAZY_CASES))
def test_lazy_policy_invariants(case):
    overrides = _with_period(LAZY_CASES[case])
    cfg, p, slack = _knobs(overrides)
    B, o, D = p.refresh_budget, p.overlap, p.max_drop
    seen = {"max_refresh": 0}

    def spy(cache, policy):
        pos = cache.token_pos
        assert list(pos[:S]) == list(range(S)), "a sink was evicted"
        assert (np.diff(pos) > 0).all(), "cache order must stay text order"
        r = policy.n_refresh
        assert 0 <= r <= B, f"refresh region {r} > budget {B}"
        seen["max_refresh"] = max(seen["max_refresh"], r)
        body = pos[S + r:]
        assert (np.diff(body) == 1).all() and body[-1] == cache.next_pos - 1, "the window must be the newest tokens"
        assert len(body) >= W + o, "a prune went below window + overlap"

    res, policy = run(*overrides, spy=spy)
    vis, ev = res.visible_kv, res.events
    assert len(ev) > 5
    for e in ev:
        # a prune may evict nothing when its whole segment moves into a refresh region not yet full
        assert e["dropped"] + e["refreshed"] >= 1 and e["kept"] == e["visible_after"]
        if D is not None:
            assert e["dropped"] <= D
        if D is None and p.mode is None:  # periodic trigger, no cap: each prune evicts R - overlap
            assert e["dropped"] <= R - o and (B > 0 or e["dropped"] == R - o)
        assert e["refreshed"] <= (p.refresh_per_prune or B)
        assert e["visible_before"] <= policy.capacity
    steady = vis[ev[0]["step"] + 1:]
    assert steady.min() >= S + W + o
    assert steady.max() <= S + B + W + slack
    assert vis.max() <= policy.capacity - 1
    if B:
        assert seen["max_refresh"] == B and sum(e["refreshed"] for e in ev) > 0
    if p.mode == "entropy":  # early prunes happen, and so do prunes at the full slack
        drops = {e["dropped"] for e in ev}
        assert min(drops) < slack + 1 - o and max(drops) == slack + 1 - o


def test_max_drop_8_over_600_tokens():
    r, _ = run("policy=max_drop", "policy.max_drop=8", "compress_every=32", "window=64")
    drops = [e["dropped"] for e in r.events]
    assert max(drops) == 8 and all(1 <= d <= 8 for d in drops)
    assert r.visible_kv[100:].max() <= 4 + 64 + 31


def test_max_drop_after_prefill_prunes_over_several_steps():
    r, _ = run(f"n_sink={S}", f"window={W}", "compress_every=4", "policy=max_drop", "policy.max_drop=6",
               "prefill_tokens=150", n=300)
    ev = r.events
    assert all(e["dropped"] <= 6 for e in ev)
    # pruning mode: one prune per step right after the prefill until the cache is back to S + W
    first = [e for e in ev if e["step"] < 150 + 40]
    assert [e["step"] for e in first[:5]] == [149, 150, 151, 152, 153]
    after = [e["visible_after"] for e in first]
    assert after[0] == 150 - 6 and min(after) == S + W


BASELINE_CASES = {
    "snapkv": ["policy=snapkv", "policy.obs_window=6", "policy.kernel_size=3"],
    "snapkv-max-R1": ["policy=snapkv", "policy.pooling=max", "compress_every=1"],
    "h2o": ["policy=h2o", "policy.recent_frac=0.25"],
    "h2o-R1-prefill": ["policy=h2o", "compress_every=1", "prefill_tokens=64"],
    "tova": ["policy=tova"],
}


@pytest.mark.parametrize("case", list(BASELINE_CASES))
def test_baseline_invariants(case):
    overrides = _with_period(BASELINE_CASES[case])
    cfg = compose("model=tiny_llama", *overrides)

    def spy(cache, policy):
        pos = cache.token_pos
        assert list(pos[:S]) == list(range(S)), "a sink was evicted"
        assert (np.diff(pos) > 0).all()
        assert len(pos) == S + W, "a prune must land exactly on the budget"
        k = policy.n_recent
        assert list(pos[len(pos) - k:]) == list(range(cache.next_pos - k, cache.next_pos)), "recent tokens kept"

    res, policy = run(*overrides, n=NEQ, spy=spy)
    assert policy.position_mode == "original"
    Rc = cfg.compress_every
    steady = res.visible_kv[cfg.prefill_tokens + 1:] if cfg.prefill_tokens else res.visible_kv[S + W:]
    assert steady.max() <= S + W + Rc - 1 and steady.min() >= S + W
    assert all(e["visible_after"] == S + W for e in res.events)
    assert np.isfinite(res.nll).all()
    if Rc == R and not cfg.prefill_tokens:  # same budget and period as streaming, other choices
        assert np.abs(res.nll - streaming(NEQ).nll).max() > 1e-4


@pytest.mark.parametrize("policy", ["tova", "h2o", "snapkv"])
def test_baseline_shift_positions_are_contiguous(policy):
    """policy.positions=shift: after every prune the query sits at the next position after the kept
    tokens' contiguous ones (concat: cache index), not at its text position; with R=1 and a text longer
    than the budget this changes the NLL, while the kept-token invariants hold as with original."""
    overrides = [f"policy={policy}", f"n_sink={S}", f"window={W}", "compress_every=1"]
    seen = []

    def spy(cache, pol):
        assert len(cache.token_pos) == S + W and pol.position_mode == "shift"
        assert cache.position_mode == "shift"
        assert (cache._key_pos.numpy() == np.arange(len(cache._key_pos))).all()  # keys at 0..L-1 (the step's)
        seen.append(int(pol.decoder.q_pos[-1]))

    res, pol = run(*overrides, "policy.positions=shift", n=NEQ, spy=spy)
    assert pol.position_mode == "shift" and set(seen) == {S + W}  # query at L - 1 = n_sink + window
    orig, pol_o = run(*overrides, n=NEQ)
    assert pol_o.position_mode == "original"
    assert np.isfinite(res.nll).all()
    assert np.abs(res.nll - orig.nll)[S + W + 1:].max() > 1e-3
    np.testing.assert_array_equal(res.nll[:S + W + 1], orig.nll[:S + W + 1])  # before the first prune


# ---------------------------------------------------------------- baselines on hand-made attention


def _baseline(name, n_sink, window, compress_every=1, n_heads=1, n_kv_heads=1, **knobs):
    from streamkv.policies import build_policy

    cfg = compose("model=tiny_llama", f"policy={name}", f"n_sink={n_sink}", f"window={window}",
                  f"compress_every={compress_every}", *[f"policy.{k}={v}" for k, v in knobs.items()])
    pol = build_policy(cfg)
    decoder = SimpleNamespace(shape=SimpleNamespace(n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads),
                              scale=1.0, attention_observer=None)
    cache = SimpleNamespace(token_pos=np.zeros(0, dtype=np.int64))
    pol.attach(decoder, cache)
    assert decoder.attention_observer == pol.observe
    return pol, cache


def _step(pol, cache, token_pos, q, k, mask=None):
    from streamkv.policies import StepView

    cache.token_pos = np.asarray(token_pos, dtype=np.int64)
    pol.observe(0, torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), mask)
    d = pol.decide(StepView(token_pos=cache.token_pos, step=int(cache.token_pos[-1])))
    return None if d is None else d.keep.tolist()


def _keys(*cols):
    """k [1, 1, L, D] from per-dimension logit columns."""
    return np.stack(cols, axis=-1)[None, None]


def test_tova_keeps_what_the_current_query_attends_to_averaged_over_heads():
    # 2 query heads sharing 1 KV head (GQA): head 0 reads dim 0, head 1 reads dim 1
    pol, cache = _baseline("tova", n_sink=1, window=4, n_heads=2, n_kv_heads=1)
    a = [0, 10, 2, 0, 0, 0, 0]  # head 0: slot 1 >> slot 2 > rest
    b = [0, 0, 0, 0, 10, 1, 0]  # head 1: slot 4 >> slot 5 > rest
    q = np.array([[1.0, 0.0], [0.0, 1.0]])[None, :, None, :]
    keep = _step(pol, cache, range(7), q, _keys(a, b))
    # budget 5 = sink 0 + newest 6 + the 3 best of slots 1..5: 1, 4 (~0.5 each), then 2 (e^2 > e^1)
    assert keep == [0, 1, 2, 4, 6]


def test_tova_no_prune_within_budget():
    pol, cache = _baseline("tova", n_sink=1, window=4)
    assert _step(pol, cache, range(5), np.ones((1, 1, 1, 1)), _keys([0, 1, 2, 3, 4])) is None


def test_h2o_keeps_accumulated_heavy_hitters():
    pol, cache = _baseline("h2o", n_sink=1, window=5, recent_frac=0.4)  # recent 2, heavy 3, budget 6
    q = np.ones((1, 1, 1, 1))
    # step 1 (6 tokens, within budget): the query attends text position 1
    assert _step(pol, cache, range(6), q, _keys([0, 10, 0, 0, 0, 0])) is None
    # step 2 (7 tokens): attends position 3, a little 2 and 4. The current query alone would keep
    # 3, 2, 4 of slots 1..4; accumulated, position 1 is a heavy hitter and position 4 goes.
    assert _step(pol, cache, range(7), q, _keys([0, 0, 4, 10, 3, 0, 0])) == [0, 1, 2, 3, 5, 6]
    # step 3: cache holds positions [0, 1, 2, 3, 5, 6, 7]; the query attends position 5 (slot 4):
    # the accumulated scores must follow their tokens through the eviction -> position 2 goes
    assert _step(pol, cache, [0, 1, 2, 3, 5, 6, 7], q, _keys([0, 0, 0, 0, 10, 0, 0])) == [0, 1, 3, 4, 5, 6]


@pytest.mark.parametrize("kernel,pooling,expected", [
    (1, "avg", [0, 2, 3, 5, 6, 7]),  # raw scores: 5 (0.35), 2 and 3 (0.3)
    (3, "avg", [0, 2, 3, 4, 6, 7]),  # pooled: 4 (0.65/3) > 2, 3 (0.6/3) > 5 (0.35/3) > 1 (0.3/3)
    (3, "max", [0, 1, 4, 5, 6, 7]),  # pooled max: 4, 5 (0.35), then 1, 2, 3 tie (0.3): the older, 1
])
def test_snapkv_scores_with_observation_window_and_pooling(kernel, pooling, expected):
    pol, cache = _baseline("snapkv", n_sink=1, window=5, obs_window=2, kernel_size=kernel, pooling=pooling)
    w = np.array([1e-6, 1e-6, 0.3, 0.3, 1e-6, 0.35, 0.05, 1e-9])
    k = _keys(np.log(w))
    q = np.ones((1, 1, 2, 1))  # two observation queries (e.g. a prefill of 8 tokens), same attention
    keep = _step(pol, cache, range(8), q, k)
    # budget 6 = sink 0 + observation window 6, 7 + the 3 best of slots 1..5
    assert keep == expected


def test_snapkv_ring_is_causal_by_position():
    """A query of the ring scores only the keys at or before its own position (its softmax is over
    those): here the older query would be drowned by a later key if it could see it."""
    pol, cache = _baseline("snapkv", n_sink=0, window=3, obs_window=2, kernel_size=1)
    qa, qb = np.array([1.0, 0.0])[None, None, None], np.array([0.0, 1.0])[None, None, None]
    # step at position 3 (query A): 4 tokens > budget 3 -> keep the best of slots 0..1 + slots 2, 3
    assert _step(pol, cache, range(4), qa, _keys(np.log([0.1, 0.7, 0.1, 0.1]), [0, 0, 0, 0])) == [1, 2, 3]
    # step at position 4 (query B); the ring holds A (pos 3) and B (pos 4); cache positions 1, 2, 3, 4.
    # A prefers position 1 (0.6 vs 0.2), B position 2 (0.4 vs 0.3): mean 0.45 vs 0.3 -> keep position 1.
    # Were A to see position 4 (logit 20), its weights would vanish and position 2 would win.
    a = [np.log(0.6), np.log(0.2), np.log(0.2), 20.0]
    b = np.log([0.3, 0.4, 0.2, 0.1])
    assert _step(pol, cache, [1, 2, 3, 4], qb, _keys(a, b)) == [0, 2, 3]


# ---------------------------------------------------------------- refresh selection pieces


def test_refresh_selection_pieces():
    from streamkv.models import ByteTokenizer
    from streamkv.policies.pieces import TokenClasses, select_refresh, spread

    assert spread(10, 3).tolist() == [1, 5, 8] and spread(4, 8).tolist() == [0, 1, 2, 3]
    text = 'He left. "No" she said\nthen ran'
    ids = np.array(ByteTokenizer().encode(text))
    seg = np.arange(len(ids))
    picks = select_refresh("structural", 4, seg, token_ids=ids, classes=TokenClasses(ByteTokenizer()))
    assert [text[i] for i in picks] == [".", '"', '"', "\n"]  # newline > sentence end > quotes
    ent = np.zeros(len(ids))
    ent[[3, 7, 20]] = [2.0, 5.0, 1.0]
    assert select_refresh("entropy", 2, seg, entropy=ent).tolist() == [3, 7]
    assert select_refresh("uniform", 2, seg).tolist() == [len(ids) // 4, 3 * len(ids) // 4]


def test_structural_classes_from_a_hf_tokenizer():
    """SmolLM2's byte-level BPE: classes come from decoded strings (e.g. 'Ċ' pieces decode to '\\n')."""
    from streamkv.policies.pieces import NEWLINE, OTHER, QUOTE, SENTENCE_END, TokenClasses

    from transformers import AutoTokenizer

    from streamkv.models import converted_smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(converted_smollm2_dir()))
    text = 'The cat sat.\n\nShe said "hello" then'
    ids = tok.encode(text)
    cls = TokenClasses(tok)(np.array(ids))
    pieces = {tok.decode([i]): c for i, c in zip(ids, cls)}
    assert pieces[" cat"] == OTHER
    assert NEWLINE in cls.tolist() and SENTENCE_END in cls.tolist() and QUOTE in cls.tolist()
    for s, c in pieces.items():
        assert (c == NEWLINE) == ("\n" in s)


def test_refresh_region_is_the_tokens_selected_from_evicted_segments():
    kept = {}

    def spy(cache, policy):
        kept[int(cache.next_pos)] = cache.token_pos[S:S + policy.n_refresh].tolist()

    run(f"n_sink={S}", f"window={W}", f"compress_every={R}", "policy=refresh", "policy.refresh_budget=4",
        "policy.refresh_per_prune=2", n=120, spy=spy)
    # first prune after the step at position S+W+R-1: evicts positions S..S+R-1, refreshes 2 spread
    # evenly (R=8: offsets 2 and 6); the next prune evicts the following 8 and adds 2 more; the
    # third prune pushes the oldest two out (budget 4)
    regions = [kept[k] for k in sorted(kept)]
    assert regions[0] == [S + 2, S + 6]
    assert regions[1] == [S + 2, S + 6, S + R + 2, S + R + 6]
    assert regions[2] == [S + R + 2, S + R + 6, S + 2 * R + 2, S + 2 * R + 6]


# ---------------------------------------------------------------- config validation


BAD = [
    (["policy=overlap", "policy.overlap=40", "compress_every=32"],
     "policy.overlap: must be < compress_every (got 40 >= 32)"),
    (["policy=max_drop", "policy.max_drop=0"], "policy.max_drop: must be >= 1 (got 0)"),
    (["policy=max_drop", "policy.max_drop=null"], "policy.max_drop: required for policy=max_drop"),
    (["policy=refresh", "policy.refresh_select=random"], "policy.refresh_select: 'random' is not one of"),
    (["policy=refresh", "policy.refresh_budget=-1"], "policy.refresh_budget: must be >= 0 (got -1)"),
    (["policy=refresh", "policy.refresh_budget=4", "policy.refresh_per_prune=8"],
     "policy.refresh_per_prune: must be <= policy.refresh_budget (got 8 > 4)"),
    (["policy=snapkv", "policy.refresh_budget=16"], "policy.refresh_budget: not a knob of policy=snapkv"),
    (["policy=tova", "policy.pooling=max"], "policy.pooling: not a knob of policy=tova"),
    (["policy=full", "policy.overlap=2"], "policy.overlap: not a knob of policy=full"),
    (["policy=streaming", "policy.max_drop=8"], "policy.max_drop: not a knob of policy=streaming"),
    (["policy=adaptive", "compress_every=32"], "compress_every: policy.mode=slack replaces the fixed period"),
    (["policy=adaptive", "policy.mode=fast"], "policy.mode: 'fast' is not one of slack, entropy"),
    (["policy=adaptive", "policy.mode=null"], "policy.mode: required for policy=adaptive"),
    (["policy=adaptive", "policy.mode=entropy", "policy.entropy_low=5", "policy.entropy_high=4"],
     "policy.entropy_low: must be >= 0 and < policy.entropy_high"),
    (["policy=adaptive", "policy.extra_slack=4", "policy.overlap=8"], "policy.overlap: must be <= policy.extra_slack"),
    (["policy=max_drop", "policy.refresh_select=entropy"],
     "policy.refresh_select: has no effect while policy.refresh_budget is off"),
    (["policy=max_drop", "policy.extra_slack=8"], "policy.extra_slack: has no effect while policy.mode is off"),
    (["policy=max_drop", "policy.mode=slack", "policy.entropy_high=6"], "policy.entropy_high: only used with"),
    (["policy=snapkv", "policy.obs_window=100", "window=64"], "policy.obs_window: must be between 1 and window=64"),
    (["policy=snapkv", "policy.kernel_size=4"], "policy.kernel_size: must be an odd number"),
    (["policy=snapkv", "policy.pooling=median"], "policy.pooling: 'median' is not one of avg, max"),
    (["policy=h2o", "policy.recent_frac=1.5"], "policy.recent_frac: must be between 0 and 1"),
    (["policy=max_drop", "policy.no_such_knob=1"], "policy.no_such_knob"),
    (["policy=tova", "policy.positions=bogus"], "policy.positions: 'bogus' is not one of original, shift"),
    (["policy=snapkv", "policy.positions=none"], "policy.positions: 'none' is not one of original, shift"),
    (["policy=streaming", "policy.positions=shift"], "policy.positions: not a knob of policy=streaming"),
    (["policy=refresh", "policy.positions=original"], "policy.positions: not a knob of policy=refresh"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_policy_config_fails_with_one_line(overrides, message):
    from streamkv.cli import precheck
    from streamkv.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        precheck(["model=tiny_llama", *overrides])
    msg = str(exc.value)
    assert "\n" not in msg and message in msg, msg


GOOD = [
    ["policy=tova", "policy.positions=shift"],
    ["policy=h2o", "policy.positions=original"],
    ["policy.name=snapkv", "policy.positions=shift"],  # no preset: the schema's null = original
    ["policy=refresh", "policy.refresh_budget=0", "policy.refresh_select=entropy"],  # the refresh sweep's control
    ["policy=adaptive", "policy.mode=slack", "policy.entropy_high=6"],  # the adaptive sweep's control
    ["policy=max_drop", "policy.refresh_budget=16", "policy.mode=slack", "policy.extra_slack=16"],
    ["policy=overlap", "compress_every=32", "policy.refresh_budget=8", "policy.refresh_select=structural"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) for o in GOOD])
def test_good_compositions_validate(overrides):
    from streamkv.cli import precheck

    precheck(["model=tiny_llama", *overrides])  # raises ConfigError on a bad combination


@pytest.mark.parametrize("overrides", [
    ["policy=overlap", "policy.overlap=40", "compress_every=32"],
    ["policy=h2o", "policy.refresh_budget=16"],
    ["policy=tova", "policy.positions=bogus"],
])
def test_bad_policy_config_cli_exits_2_with_one_line(overrides, tmp_path):
    proc = run_cli("model=tiny_llama", "device=cpu", *overrides, f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: policy."), proc.stderr
    assert not (tmp_path / "run" / "result.json").exists()


# ---------------------------------------------------------------- the CLI sweep


@pytest.fixture(scope="session")
def policy_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy_sweep")
    proc = run_cli("-m", "model=tiny_llama", "policy=max_drop,refresh", "compress_every=32,64", "window=64",
                   "dataset.max_tokens=400", "device=cpu", f"hydra.sweep.dir={d}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_cli_sweep_max_drop_refresh(policy_sweep):
    import json

    runs = sorted(p for p in policy_sweep.iterdir() if (p / "result.json").is_file())
    assert len(runs) == 4
    seen = set()
    for p in runs:
        res = json.loads((p / "result.json").read_text())
        assert res["status"] == "ok"
        m = res["metrics"]
        assert m["n_prunes"] > 0 and "spike_peak_mean" in m and "spike_area_max" in m
        seen.add((res["config"]["policy"]["name"], res["config"]["compress_every"]))
        if res["config"]["policy"]["name"] == "max_drop":
            assert m["drop_max"] <= res["config"]["policy"]["max_drop"]
        else:
            assert m["refreshed_total"] > 0
    assert seen == {("max_drop", 32), ("max_drop", 64), ("refresh", 32), ("refresh", 64)}
