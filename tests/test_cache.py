"""Cache managers (docs/cache.md): every manager x every policy gives concat's per-token NLL and the
same event log; ring never copies the window; soft_ring copies only at wrap-around; static
compacts in place; memory = the preallocated capacity; 20000-token runs stay exact.

Tolerance: max |NLL - concat NLL| per token <= 1e-4 (float32, CPU). Measured: <= 2.4e-6 on the
400-token matrix (tiny models), <= 1e-5 on 20000 tokens (see docs/cache.md for the table).

Runtime: the 20000-token runs dominate; their concat references run in a second process
(`python tests/test_cache.py --reference OUT`) while this one runs the managers.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import PYTHON, ROOT, compose, evaluate_with_cache, load, text_ids  # noqa: E402

from streamkv.cache import CACHES, build_cache  # noqa: E402
from streamkv.errors import ConfigError  # noqa: E402
from streamkv.policies import POLICIES  # noqa: E402

TOL = 1e-4
MANAGERS = [name for name in sorted(CACHES) if name != "concat"]
BASE = ("n_sink=4", "window=32")
# knobs that make each policy prune often on 400 tokens; a policy not listed runs with its preset
POLICY_KNOBS = {
    "streaming": ("compress_every=4",),
    "max_drop": ("compress_every=16", "policy.max_drop=4"),
    "overlap": ("compress_every=16", "policy.overlap=8"),
    "refresh": ("compress_every=8", "policy.refresh_budget=8", "policy.refresh_per_prune=4"),
    "adaptive": ("policy.extra_slack=16",),
    "snapkv": ("compress_every=4",),
    "h2o": ("compress_every=2",),
    "tova": (),
    "full": (),
}
# more cases, one per code path not covered above: (policy, model, extra overrides)
EXTRA = [
    ("streaming", "tiny_llama", ("compress_every=1",)),  # a prune after every step
    ("streaming", "tiny_llama", ("compress_every=4", "prefill_tokens=64")),  # prefill > capacity of steps
    ("streaming", "tiny_neox", ("compress_every=4",)),  # partial rotary, no GQA
    ("refresh", "tiny_neox", ("compress_every=8", "policy.refresh_budget=8", "policy.refresh_per_prune=4")),
    ("h2o", "tiny_llama", ("compress_every=2", "prefill_tokens=64")),  # original positions + prefill mask
]


def _policy_override(name: str) -> str:
    return f"policy={name}" if (ROOT / "conf" / "policy" / f"{name}.yaml").is_file() else f"policy.name={name}"


def _overrides(policy: str, extra=None) -> tuple:
    knobs = POLICY_KNOBS.get(policy, ()) if extra is None else extra
    return (_policy_override(policy), *BASE, *knobs)


def run(kind: str, ids: torch.Tensor, cache: str, *overrides: str, spy=None):
    """One in-process run -> (EvalResult, the cache manager)."""
    return evaluate_with_cache(kind, ids, f"cache={cache}", "progress=false", *overrides, spy=spy)


@functools.lru_cache(maxsize=64)
def concat_ref(kind: str, n: int, overrides: tuple):
    return run(kind, text_ids(kind, n=n), "concat", *overrides)[0]


def assert_same_as_concat(r, ref, tol=TOL):
    diff = np.abs(r.nll - ref.nll).max()
    assert diff <= tol, f"max |NLL - concat| = {diff:.2e} > {tol}"
    assert r.events == ref.events
    assert (r.visible_kv == ref.visible_kv).all()
    return diff


# ---------------------------------------------------------------- every manager x every policy


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("manager", MANAGERS)
def test_manager_equals_concat(manager, policy):
    ov = _overrides(policy)
    ids = text_ids("tiny_llama", n=400)
    ref = concat_ref("tiny_llama", 400, ov)
    r, cache = run("tiny_llama", ids, manager, *ov)
    assert_same_as_concat(r, ref)
    if policy != "full":
        assert r.events, "the case must prune"
    assert cache.stats["grows"] == 0, "the derived capacity must hold the policy (its `capacity` bound)"


@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("policy,kind,extra", EXTRA, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_manager_equals_concat_more(manager, policy, kind, extra):
    if policy not in POLICIES:
        pytest.skip(f"policy {policy} not registered")
    ov = _overrides(policy, extra)
    ids = text_ids(kind, n=400)
    r, cache = run(kind, ids, manager, *ov)
    assert_same_as_concat(r, concat_ref(kind, 400, ov))
    assert cache.stats["grows"] == 0


# ---------------------------------------------------------------- score-based policies with StreamingLLM positions

SHIFT_CASES = {  # policy.positions=shift: every kept token before a gap is a side token (re-rotated at prunes)
    "tova": ("policy=tova", "compress_every=1"),
    "h2o": ("policy=h2o", "compress_every=2", "prefill_tokens=64"),
    "snapkv": ("policy=snapkv", "compress_every=4"),  # observation queries re-positioned after prunes
}


@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("policy", list(SHIFT_CASES))
def test_scored_shift_positions_equal_concat(manager, policy):
    """tova / h2o / snapkv with positions=shift: the same kept tokens at every prune, events and
    per-token NLL as concat (which re-rotates every key at its cache index every step)."""
    ov = (*BASE, *SHIFT_CASES[policy], "policy.positions=shift")
    ids = text_ids("tiny_llama", n=300)
    kept: dict = {"concat": [], manager: []}

    def spy(name):
        return lambda cache: kept[name].append(cache.token_pos.copy())

    ref, _ = run("tiny_llama", ids, "concat", *ov, spy=spy("concat"))
    r, cache = run("tiny_llama", ids, manager, *ov, spy=spy(manager))
    assert cache.position_mode == "shift"
    assert_same_as_concat(r, ref)
    assert len(kept[manager]) == len(kept["concat"]) > 10
    for a, b in zip(kept[manager], kept["concat"]):
        np.testing.assert_array_equal(a, b)
    assert cache.stats["grows"] == 0, "the side buffer must be sized for the policy (side_bound)"
    assert cache.stats["rotated"] > 0, "kept tokens before a gap must be re-positioned"


# ---------------------------------------------------------------- random keeps, manager level


def _drive(cache, rope, seed: int, steps: int = 100, prefill: int = 5, limit: int = 12):
    """Feed random K/V (same for every manager) and attend with random queries; after each step keep a
    random ascending subset (gaps anywhere, sometimes without the newest token) once the cache holds
    `limit` tokens. Returns the attention outputs."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    L, Hkv, D = cache.n_layers, cache.n_kv_heads, cache.head_dim
    outs = []
    t = 0
    while t < steps:
        n_new = prefill if t == 0 else 1
        q_pos = cache.begin(n_new)
        for layer in range(L):
            k, v = torch.randn(1, Hkv, n_new, D, generator=g), torch.randn(1, Hkv, n_new, D, generator=g)
            q = torch.randn(1, 2 * Hkv, n_new, D, generator=g)
            k_all, v_all, mask = cache.update(layer, k, v, rope)
            outs.append(F.scaled_dot_product_attention(rope.rotate(q, q_pos), k_all, v_all, attn_mask=mask,
                                                       enable_gqa=True))
        cache.end()
        t += n_new
        n = len(cache.token_pos)
        if n >= limit:
            size = int(rng.integers(3, limit - 2))
            pool = n if rng.random() < 0.8 else n - 1  # sometimes the newest token goes too
            cache.evict(np.sort(rng.choice(pool, size=size, replace=False)))
    return outs


@pytest.mark.parametrize("scaling", [1.0, 1.3])
@pytest.mark.parametrize("mode", ["shift", "original"])
@pytest.mark.parametrize("manager", MANAGERS)
def test_random_keeps_match_concat(manager, mode, scaling):
    """Arbitrary keep patterns (side tokens anywhere, gaps after the newest token), partial rotary,
    GQA, prefill, attention_scaling != 1: every manager attends exactly like concat."""
    from streamkv.decoder import RotaryTable

    D = 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D // 2, 2, dtype=torch.float32) / (D // 2)))  # rotary dim D/2
    rope = RotaryTable(inv_freq, scaling, 200, torch.float32)

    def make(name):
        return build_cache(name, n_layers=2, n_kv_heads=2, head_dim=D, dtype=torch.float32,
                           device=torch.device("cpu"), position_mode=mode, capacity=12, side_capacity=2)

    for seed in range(2):
        ref = _drive(make("concat"), rope, seed)
        cache = make(manager)
        got = _drive(cache, rope, seed)
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        assert diff < 1e-5, f"seed {seed}: max |out - concat| = {diff:.2e}"
        if mode == "shift":
            assert cache.stats["rotated"] > 0 and cache.stats["captured"] > 2


# ---------------------------------------------------------------- what each manager copies


def _window_rows_never_move(policy_overrides):
    """Run ring with a spy: a token in the window (text suffix) keeps its slot and its K/V rows stay
    bitwise unchanged across prunes until it leaves the window; the buffers are never reallocated."""
    ids = text_ids("tiny_llama", n=400)
    seen: dict = {}  # text position -> (slot, k rows, v rows)
    checked = [0]
    ptrs = set()

    def spy(cache):
        ptrs.add((cache.k.data_ptr(), cache.v.data_ptr()))
        pos, slots = cache.token_pos, cache.slots
        n = len(pos)
        suffix = (cache.next_pos - 1 - pos) == (n - 1 - np.arange(n))  # the window: true positions
        for p, s, in_window in zip(pos.tolist(), slots.tolist(), suffix.tolist()):
            if not in_window:
                seen.pop(p, None)
                continue
            k, v = cache.k[:, :, s].clone(), cache.v[:, :, s].clone()
            if p in seen:
                s0, k0, v0 = seen[p]
                assert s == s0 and torch.equal(k, k0) and torch.equal(v, v0), f"window token {p} moved"
                checked[0] += 1
            else:
                seen[p] = (s, k, v)

    r, cache = run("tiny_llama", ids, "ring", *policy_overrides, spy=spy)
    assert checked[0] > 1000 and len(ptrs) == 1
    return r, cache


def test_ring_never_copies_the_window():
    r, cache = _window_rows_never_move(_overrides("streaming", ("compress_every=4",)))
    st = cache.stats
    n_prunes = len(r.events)
    assert st["moved"] == 0 and st["side_v_moved"] == 0 and st["compactions"] == 0
    assert st["captured"] == 4  # each sink's reference row is taken once (at the first prune)
    assert st["rotated"] == 4 * n_prunes  # O(n_sink) per prune: only the sinks are re-rotated
    assert st["written"] == 399  # one row per token, never rewritten


def test_ring_never_copies_the_window_refresh():
    if "refresh" not in POLICIES:
        pytest.skip("policy refresh not registered")
    r, cache = _window_rows_never_move(_overrides("refresh", POLICY_KNOBS["refresh"]))
    st = cache.stats
    assert st["moved"] == 0 and st["side_v_moved"] == 0
    budget = 4 + 8  # sinks + refresh budget
    assert 4 < st["captured"] and st["rotated"] <= budget * len(r.events)


def test_soft_ring_copies_only_at_wrap_around():
    ids = text_ids("tiny_llama", n=400)
    r, cache = run("tiny_llama", ids, "soft_ring", *_overrides("streaming", ("compress_every=1",)))
    st = cache.stats
    assert st["moved"] == 0  # a prune never moves the window
    assert st["side_v_moved"] == 4 * len(r.events)  # the sinks' values follow the start index
    cap = cache.capacity
    assert cap == 4 + 32 + 1
    assert cache.n_slots == 2 * cap
    # the live run (n_sink + window tokens) is copied once every ~capacity steps
    assert 0 < st["compactions"] <= len(ids) // (cap - 1)
    assert st["compacted"] <= st["compactions"] * cap


def test_static_compacts_in_place():
    ids = text_ids("tiny_llama", n=400)
    ptrs = set()
    r, cache = run("tiny_llama", ids, "static", *_overrides("streaming", ("compress_every=4",)),
                   spy=lambda c: ptrs.add(c.k.data_ptr()))
    assert len(ptrs) == 1  # same memory throughout
    assert cache.stats["moved"] == 32 * len(r.events)  # the window moves to the front at every prune


# ---------------------------------------------------------------- memory and capacity


@pytest.mark.parametrize("manager", MANAGERS)
def test_nbytes_is_the_preallocated_capacity(manager):
    L, H, D, cap, side = 3, 2, 8, 50, 5
    cache = build_cache(manager, n_layers=L, n_kv_heads=H, head_dim=D, dtype=torch.float32,
                        device=torch.device("cpu"), capacity=cap, side_capacity=side)
    slots = 2 * cap if manager == "soft_ring" else cap
    assert cache.capacity == cap and cache.n_slots == slots and cache.side_slots == side
    # K and V slots, plus the un-moved reference keys of the side tokens (sinks + refresh)
    assert cache.nbytes() == L * (2 * slots + side) * H * D * 4
    orig = build_cache(manager, n_layers=L, n_kv_heads=H, head_dim=D, dtype=torch.float32,
                       device=torch.device("cpu"), capacity=cap, side_capacity=side, position_mode="original")
    assert orig.nbytes() == L * 2 * slots * H * D * 4  # original positions: no side buffer


@pytest.mark.parametrize("manager", MANAGERS)
def test_capacity_from_config_and_no_growth(manager):
    ids = text_ids("tiny_llama", n=200)
    r, cache = run("tiny_llama", ids, manager, *_overrides("streaming", ("compress_every=8",)))
    m = load("tiny_llama").model.config
    L, H, D = m.num_hidden_layers, m.num_key_value_heads, m.hidden_size // m.num_attention_heads
    assert cache.capacity == 4 + 32 + 8 == r.visible_kv.max() + 1
    slots = 2 * cache.capacity if manager == "soft_ring" else cache.capacity
    assert cache.nbytes() == L * (2 * slots + 4) * H * D * 4  # 4 sinks' reference rows
    assert cache.stats["grows"] == 0


def test_capacity_override_and_check():
    cfg = compose("model=tiny_llama", "cache=ring", "cache.capacity=100", *BASE)
    from streamkv.sizing import cache_sizes

    assert cache_sizes(cfg, 1000)["capacity"] == 100
    with pytest.raises(ConfigError, match=r"^cache.capacity: 20 is below"):
        compose("model=tiny_llama", "cache=ring", "cache.capacity=20", *BASE)
    for name in MANAGERS:  # full: capacity = the text
        assert cache_sizes(compose("model=tiny_llama", f"cache={name}", "policy=full"), 300)["capacity"] == 300


def test_explicit_capacity_same_nll():
    ov = _overrides("streaming", ("compress_every=4",))
    ids = text_ids("tiny_llama", n=400)
    r, cache = run("tiny_llama", ids, "ring", *ov, "cache.capacity=64")
    assert cache.capacity == 64 and cache.stats["grows"] == 0
    assert_same_as_concat(r, concat_ref("tiny_llama", 400, ov))


@pytest.mark.parametrize("manager", MANAGERS)
def test_growth_fallback_is_correct(manager):
    """A policy that holds more than the capacity it declared: the buffers grow (logged), still exact."""
    from streamkv.runner import make_evaluator

    ov = _overrides("streaming", ("compress_every=4",))
    ids = text_ids("tiny_llama", n=200)
    cfg = compose("model=tiny_llama", f"cache={manager}", "progress=false", *ov)
    ev = make_evaluator(cfg, load("tiny_llama").model, len(ids), torch.device("cpu"))
    c = ev.cache
    ev.cache = build_cache(manager, n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                           dtype=c.dtype, device=c.device, capacity=8, side_capacity=1)
    r = ev.run(ids, 0)
    assert ev.cache.stats["grows"] >= 2  # K/V slots and the side buffer
    assert_same_as_concat(r, concat_ref("tiny_llama", 200, ov))


# ---------------------------------------------------------------- 20000 tokens (positions 20k+)

LONG_N = 20000
LONG_OV = {R: ("n_sink=4", "window=64", f"compress_every={R}") for R in (1, 8)}
# (manager, R) compared with (concat, R). A worker process, started at this module's first test, runs
# the concat references of the selected 20000-token cases (and the cases in WORKER_RUNS) while this
# process runs the other tests, then the ring cases.
WORKER_RUNS = [("soft_ring", 8)]
LONG_CASES = [("ring", 1), ("ring", 8), ("soft_ring", 8)]


def _long_ids() -> torch.Tensor:
    ids = text_ids("tiny_llama", name="book", n=LONG_N)
    assert len(ids) == LONG_N
    return ids


def _summary(r, cache) -> dict:
    return {"nll": r.nll, "events": json.dumps(r.events), "stats": json.dumps(getattr(cache, "stats", {}))}


def compute_worker_runs(out: str, runs: list) -> None:
    """Worker entry (python tests/test_cache.py --reference OUT.npz manager:R,...): runs -> one .npz."""
    torch.set_num_threads(1)
    ids = _long_ids()
    arrays = {}
    for manager, R in runs:
        for k, v in _summary(*run("tiny_llama", ids, manager, *LONG_OV[R])).items():
            arrays[f"{manager}-{R}::{k}"] = v
    np.savez(out, **arrays)


class _Worker:
    def __init__(self, runs: list):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "ref.npz"
        spec = ",".join(f"{m}:{R}" for m, R in runs)
        self.proc = subprocess.Popen([PYTHON, __file__, "--reference", str(self.path), spec], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._data = None

    def get(self, manager: str, R: int) -> dict:
        if self._data is None:
            out, _ = self.proc.communicate(timeout=1200)
            assert self.proc.returncode == 0, f"reference worker failed:\n{out[-3000:]}"
            z = np.load(self.path)
            self._data = {k: z[k] for k in z.files}
        key = f"{manager}-{R}::"
        return {"nll": self._data[key + "nll"], "events": json.loads(str(self._data[key + "events"])),
                "stats": json.loads(str(self._data[key + "stats"]))}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.dir.cleanup()


_WORKER: list = []


@pytest.fixture(scope="module", autouse=True)
def _long_worker(request):
    """Start the worker at the module's first test, only if a 20000-token test is selected. This
    module runs single-threaded: the tiny models gain nothing from a second thread, and two busy
    processes with two OpenMP threads each spin against each other (SDPA 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases = [(item.callspec.params["manager"], item.callspec.params["R"]) for item in request.session.items
             if getattr(item, "originalname", "") == "test_20000_tokens_equal_concat"]
    runs = sorted({("concat", R) for _, R in cases} | {c for c in cases if c in WORKER_RUNS})
    if runs:
        _WORKER.append(_Worker(runs))
    yield
    while _WORKER:
        _WORKER.pop().close()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("manager,R", LONG_CASES, ids=lambda x: str(x))
def test_20000_tokens_equal_concat(manager, R):
    """Positions up to 20000 in float32 (ring / soft_ring store keys at their true positions)."""
    worker = _WORKER[0]
    if (manager, R) in WORKER_RUNS:
        got = worker.get(manager, R)
        nll, events, stats = got["nll"], got["events"], got["stats"]
    else:
        r, cache = run("tiny_llama", _long_ids(), manager, *LONG_OV[R])
        nll, events, stats = r.nll, json.loads(json.dumps(r.events)), cache.stats
        assert cache.next_pos == LONG_N - 1
    ref = worker.get("concat", R)
    diff = np.abs(nll - ref["nll"]).max()
    assert diff <= TOL, f"{manager} R={R}: max |NLL - concat| = {diff:.2e} over {LONG_N} tokens"
    assert events == ref["events"] and len(events) > 1000
    assert stats["grows"] == 0 and stats["moved"] == 0


if __name__ == "__main__":  # the reference worker
    if len(sys.argv) == 4 and sys.argv[1] == "--reference":
        compute_worker_runs(sys.argv[2], [(m, int(R)) for m, R in (x.split(":") for x in sys.argv[3].split(","))])
    else:
        sys.exit("usage: python tests/test_cache.py --reference OUT.npz manager:R[,manager:R...]")
