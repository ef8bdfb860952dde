"""dataset=passkey: the text (positions, answer mask, determinism), the answer metrics, the step-time and
position metrics, the context warning, and runs end to end on every evaluator."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose, load, run_cli


@pytest.fixture
def one_thread():
    """SmolLM2 decode steps gain little from a second thread and lose much (5x measured) when other
    processes share the cores: run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizers():
    from transformers import AutoTokenizer

    from streamkv.models import ByteTokenizer, converted_smollm2_dir

    return {"bytes": ByteTokenizer(), "smollm2": AutoTokenizer.from_pretrained(str(converted_smollm2_dir()))}


@pytest.fixture(scope="module")
def tokenizers():
    return _tokenizers()


# ---------------------------------------------------------------- the text


@pytest.mark.parametrize("tok_name", ["bytes", "smollm2"])
@pytest.mark.parametrize("length,depth", [(400, 0.0), (400, 0.1), (800, 0.5), (3000, 0.9), (3000, 1.0)])
def test_key_sits_at_depth_and_the_mask_covers_the_key(tokenizers, tok_name, length, depth):
    from streamkv.passkey import FILLER_SENTENCES, KEY_SENTENCE, QUESTION, _encode, build

    tok = tokenizers[tok_name]
    pk = build(tok, length, depth, digits=5, seed=3)
    ids = pk.ids
    assert len(ids) == length  # exact: the filler is cut to fit
    key_ids = _encode(tok, " " + KEY_SENTENCE.format(key=pk.key))
    assert ids[pk.sentence_start:pk.sentence_start + len(key_ids)] == key_ids
    # within one filler sentence of depth x (filler tokens)
    n_fill = length - len(key_ids) - len(_encode(tok, " " + QUESTION)) - len(_encode(tok, " " + pk.key))
    longest = max(len(_encode(tok, " " + s)) for s in FILLER_SENTENCES)
    assert abs(pk.sentence_start - depth * n_fill) <= longest
    # the answer mask: exactly the tokens that spell the key, at the end of the text
    assert pk.answer.shape == (length,) and pk.answer.dtype == bool
    masked = np.flatnonzero(pk.answer)
    assert masked[-1] == length - 1 and (np.diff(masked) == 1).all()
    assert "".join(tok.decode([ids[i]]) for i in masked) == pk.key
    assert tok.decode(ids[masked[0] - 1:masked[0]]).strip() == ""  # the leading space is not part of it
    text = tok.decode(ids)
    assert text.endswith(f" {QUESTION} {pk.key}")
    assert text.count(pk.key) == 3  # twice in the key sentence, once as the answer
    assert tok.decode([ids[pk.key_start]]) == pk.key[0] and pk.key_distance == pk.answer_start - pk.key_start
    assert pk.answer_start == masked[0]


def test_same_seed_same_text_other_seed_other_key(tokenizers):
    from streamkv.passkey import build, make_key

    tok = tokenizers["smollm2"]
    a, b = build(tok, 600, 0.5, seed=0), build(tok, 600, 0.5, seed=0)
    assert a.ids == b.ids and (a.answer == b.answer).all()
    keys = {make_key(s, 5) for s in range(20)}
    assert len(keys) >= 19 and all(len(k) == 5 and k[0] != "0" for k in keys)
    c = build(tok, 600, 0.5, seed=1)
    assert c.key != a.key and len(c.ids) == 600
    assert make_key(0, 5) == "56877"  # a hash of the seed: the same on every machine
    assert len(make_key(7, 8)) == 8


def test_the_pieces_tokenize_as_one_text(tokenizers):
    """Built from token ids, the text still reads as the tokenizer would encode it (no odd splits)."""
    from streamkv.passkey import build

    tok = tokenizers["smollm2"]
    pk = build(tok, 500, 0.3, seed=2)
    assert tok.encode(tok.decode(pk.ids), add_special_tokens=False) == pk.ids


def test_text_fillers_and_length_errors(tokenizers):
    from streamkv.corpora import CorpusError
    from streamkv.passkey import build

    tok = tokenizers["smollm2"]
    pk = build(tok, 1000, 0.5, filler="book", seed=0)
    assert len(pk.ids) == 1000 and "Alice" in tok.decode(pk.ids)
    with pytest.raises(CorpusError, match="dataset.length"):
        build(tok, 30, 0.5)


def test_config_validation():
    from streamkv.errors import ConfigError

    cfg = compose("model=tiny_llama", "dataset=passkey")
    assert (cfg.dataset.length, cfg.dataset.depth, cfg.dataset.digits, cfg.dataset.filler) == (4096, 0.5, 5, "repeat")
    for bad, msg in [("dataset.depth=1.5", "dataset.depth: must be between 0 and 1"),
                     ("dataset.length=10", "dataset.length: must be >= 64"),
                     ("dataset.digits=0", "dataset.digits: must be between 1 and 12"),
                     ("dataset.filler=poem", "dataset.filler: 'poem' is not one of"),
                     ("dataset.filler=text_file", "dataset.path: required for dataset.filler=text_file"),
                     ("dataset.max_tokens=100", "dataset.max_tokens: dataset=passkey takes dataset.length")]:
        with pytest.raises(ConfigError, match=msg):
            compose("model=tiny_llama", "dataset=passkey", bad)


def test_identity_of_other_datasets_is_unchanged():
    """The passkey fields (null elsewhere) leave the run identity of every other dataset as before."""
    from omegaconf import OmegaConf

    from streamkv.record import run_identity

    config = OmegaConf.to_container(compose("model=tiny_llama", "dataset=book"), resolve=True)
    before = {**config, "dataset": {k: v for k, v in config["dataset"].items()
                                    if k not in ("length", "depth", "digits", "filler")}}
    assert run_identity(config) == run_identity(before)
    pk = OmegaConf.to_container(compose("model=tiny_llama", "dataset=passkey"), resolve=True)
    assert run_identity(pk) != run_identity({**pk, "seed": 1})


# ---------------------------------------------------------------- metrics


def test_answer_metrics_by_hand():
    """Fixed logits: NLL and top-1 of the evaluator's scoring, reduced over the answer rows."""
    from streamkv.evaluate import score_tokens as _score
    from streamkv.passkey import answer_metrics

    logits = torch.tensor([[2.0, 0.0, 0.0],    # target 0: top-1
                           [0.0, 1.0, 3.0],    # target 1: not top-1 (2 is)
                           [1.0, 1.0, 0.0],    # target 1: tied with 0, counts as top-1
                           [0.0, 0.0, 5.0]])   # target 2: top-1
    targets = torch.tensor([0, 1, 1, 2])
    nll, _, top1 = _score(logits, targets)
    lse = [math.log(math.exp(2) + 2), math.log(1 + math.e + math.exp(3)), math.log(2 * math.e + 1),
           math.log(2 + math.exp(5))]
    by_hand = np.array([lse[0] - 2, lse[1] - 1, lse[2] - 1, lse[3] - 5])
    np.testing.assert_allclose(nll.numpy(), by_hand, rtol=1e-6)
    assert top1.tolist() == [True, False, True, True]
    m = answer_metrics(nll.numpy(), top1.numpy(), np.array([False, False, True, True]))
    assert m["answer_acc"] == 1 and m["answer_nll"] == pytest.approx((by_hand[2] + by_hand[3]) / 2, rel=1e-6)
    m = answer_metrics(nll.numpy(), top1.numpy(), np.array([True, True, False, False]))
    assert m["answer_acc"] == 0 and m["answer_nll"] == pytest.approx((by_hand[0] + by_hand[1]) / 2, rel=1e-6)
    assert answer_metrics(nll.numpy(), top1.numpy(), None) == {"answer_nll": None, "answer_acc": None}


def test_step_time_metrics():
    from streamkv.metrics import STEADY_AFTER, step_time_metrics

    steps = np.concatenate([np.full(10, np.nan), np.full(STEADY_AFTER, 9.0), np.arange(1.0, 101.0)])
    m = step_time_metrics(steps)
    decode = steps[10:]
    assert m["tpot_p50_ms"] == pytest.approx(np.median(decode))
    assert m["tpot_p90_ms"] == pytest.approx(np.percentile(decode, 90))
    assert m["tpot_steady_ms"] == pytest.approx(50.5)  # the mean of 1..100: the first 64 decode steps left out
    assert step_time_metrics(np.full(5, 2.0))["tpot_steady_ms"] is None  # no step after the first 64
    assert step_time_metrics(None) == {"tpot_p50_ms": None, "tpot_p90_ms": None, "tpot_steady_ms": None}


# ---------------------------------------------------------------- every evaluator

TINY = "tiny_llama"
LAZY = ("n_sink=4", "window=32", "compress_every=8")


def _pk_ids(n=300, depth=0.3):
    from streamkv.passkey import build

    pk = build(load(TINY).tokenizer, n, depth, seed=0)
    return pk, torch.tensor(pk.ids)


def _eager(ids, *overrides):
    from streamkv.runner import make_evaluator

    cfg = compose(f"model={TINY}", *overrides)
    return cfg, make_evaluator(cfg, load(TINY).model, len(ids), torch.device("cpu"), load(TINY).tokenizer)


def _graph(layout, ids, *overrides):
    from streamkv.backends.graph import GraphEvaluator

    cfg, ev = _eager(ids, f"cache={layout}", *overrides)
    return cfg, GraphEvaluator(ev, layout, capture=False, tokenizer=load(TINY).tokenizer)


CASES = {  # overrides -> the largest RoPE position on a 300-token text (299 tokens fed: positions 0..298)
    "streaming": (LAZY, 4 + 32 + 8 - 1),
    "refresh": (("policy=refresh", "policy.refresh_budget=4", *LAZY), 4 + 4 + 32 + 8 - 1),
    "full": (("policy=full",), 298),
    "tova_original": (("policy=tova", *LAZY), 298),
    "tova_shift": (("policy=tova", "policy.positions=shift", *LAZY), 4 + 32 + 8 - 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answer_and_positions_agree_on_every_evaluator(case):
    """concat x eager (the reference; its max_position is the literal largest q position id it rotated
    at), ring/static x eager, and the graph step (un-captured) on both layouts: the same top-1 row by row,
    the same answer metrics, the same max_position, equal to the value derived by hand."""
    from streamkv.passkey import answer_metrics

    overrides, expected = CASES[case]
    pk, ids = _pk_ids()
    cfg, ev = _eager(ids, *overrides)
    seen = []
    forward = ev.decoder.forward

    def spy(x, cache):
        out = forward(x, cache)
        seen.append(int(ev.decoder.q_pos.max()))
        return out

    ev.decoder.forward = spy
    ref = ev.run(ids, 0)
    assert ref.max_position == max(seen) == expected
    ref_m = answer_metrics(ref.nll, ref.top1, pk.answer[1:])
    runs = {}
    for layout in ("ring", "static"):
        runs[f"{layout} eager"] = _eager(ids, f"cache={layout}", *overrides)[1].run(ids, 0)
        if case == "tova_original" and layout == "static" or case == "tova_shift" and layout == "ring":
            continue  # those fall back to eager (tests/test_backends.py)
        _, g = _graph(layout, ids, *overrides)
        runs[f"{layout} graph"] = g.run(ids, 0)
        assert g.backend_used == "cudagraph", layout
    for name, r in runs.items():
        assert r.max_position == expected, name
        assert (r.top1 == ref.top1).all(), name
        m = answer_metrics(r.nll, r.top1, pk.answer[1:])
        assert m["answer_acc"] == ref_m["answer_acc"], name
        assert m["answer_nll"] == pytest.approx(ref_m["answer_nll"], abs=1e-5), name


def test_graph_top1_and_position_with_prefill(one_thread):
    """The prefill's rows get their top-1 too (the graph path scores them outside the step): SmolLM2, whose
    predictions on the repeated filler are mostly right (a random model's top-1 is almost never)."""
    from streamkv.backends.graph import GraphEvaluator
    from streamkv.passkey import build
    from streamkv.runner import make_evaluator

    kind, P = "smollm2_135m", 60
    ids = torch.tensor(build(load(kind).tokenizer, 120, 0.5, seed=0).ids)
    overrides = (f"model={kind}", *LAZY, f"prefill_tokens={P}", "progress=false")

    def evaluator(*extra):
        cfg = compose(*overrides, *extra)
        return make_evaluator(cfg, load(kind).model, len(ids), torch.device("cpu"), load(kind).tokenizer)

    ref = evaluator().run(ids, P)
    assert ref.top1[:P].sum() >= 15 and ref.top1[P:].sum() >= 15  # enough True rows for the comparison to mean something
    for layout in ("ring", "static"):
        r = GraphEvaluator(evaluator(f"cache={layout}"), layout, capture=False).run(ids, P)
        assert (r.top1 == ref.top1).all(), layout
        assert r.max_position == ref.max_position == P - 1, layout  # the prefill: P queries at once, > the cache bound 43


# ---------------------------------------------------------------- the context warning


@pytest.mark.parametrize("overrides,warns", [
    (("window=2048",), False),
    (("window=8187", "dataset=book"), False),  # a cache of 8192 tokens: queries at 0..8191
    (("window=8188", "dataset=book"), True),  # 8193 tokens: the query at 8192
    (("window=8188",), False),  # the same on wiki's 4096 tokens: the cache never fills
    (("policy=full", "dataset=wiki"), False),  # 4096 tokens
    (("policy=full", "dataset=book"), True),  # 20000 tokens, original positions
    (("policy=tova", "dataset=book"), True),
    (("policy=tova", "policy.positions=shift", "dataset=book"), False),
    (("policy=full", "dataset=passkey", "dataset.length=8193"), False),  # positions 0..8191
    (("policy=full", "dataset=passkey", "dataset.length=8194"), True),
    (("model=hf", "model.name_or_path=SomeOrg/unknown-model", "policy=full", "dataset=book"), False),  # unknown
])
def test_context_warning(overrides, warns):
    from streamkv.validate import context_warning

    msg = context_warning(compose(*overrides))
    assert (msg is not None) == warns, msg
    if warns:
        assert "\n" not in msg and "8192" in msg


def test_context_warning_reads_a_local_model_dir(tmp_path):
    from streamkv.validate import context_warning

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 1024}))
    cfg = compose("model=hf", f"model.name_or_path={tmp_path}", "policy=full", "dataset=wiki")
    assert "1024" in context_warning(cfg)
    assert context_warning(compose("model=hf", f"model.name_or_path={tmp_path}", "window=512")) is None


def test_precheck_warns_in_one_line(capsys):
    from streamkv.cli import precheck

    precheck(["-m", "model=tiny_llama", "window=64,300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "1 of 2 jobs" in err[0] and "256" in err[0]
    precheck(["model=tiny_llama", "window=64"])
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the command line


def test_cli_passkey_runs_record_the_answer(tmp_path):
    proc = run_cli("-m", "model=tiny_llama", "dataset=passkey", "dataset.length=400", "dataset.depth=0.1,0.9",
                   "policy=full,streaming", "window=64", "device=cpu", "progress=false",
                   f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 ok, 0 failed" in proc.stderr
    recs = sorted(tmp_path.glob("*/result.json"))
    assert len(recs) == 4
    for p in recs:
        r = json.loads(p.read_text())
        m = r["metrics"]
        assert r["status"] == "ok" and r["dataset"]["n_tokens"] == 400
        assert m["answer_acc"] in (0, 1) and m["answer_nll"] > 0 and m["key_distance"] > 0
        assert m["max_position"] == (398 if r["config"]["policy"]["name"] == "full" else 4 + 64 + 1 - 1)
        assert m["model_context"] == 256
        assert m["tpot_p50_ms"] > 0 and m["tpot_p90_ms"] >= m["tpot_p50_ms"] and m["tpot_steady_ms"] > 0
        tokens = pd.read_parquet(p.parent / "tokens.parquet")
        assert tokens["answer"].dtype == bool and tokens["answer"].sum() == 5
        assert (tokens["index"][tokens["answer"]] >= 395).all()
        assert m["answer_nll"] == pytest.approx(float(tokens["nll"][tokens["answer"]].mean()), rel=1e-5)
        pk = r["dataset"]["passkey"]
        assert m["key_distance"] == pk["answer_start"] - pk["key_start"] == 395 - pk["key_start"]
    depths = {json.loads(p.read_text())["config"]["dataset"]["depth"]: json.loads(p.read_text())["metrics"]
              ["key_distance"] for p in recs}
    assert depths[0.1] > depths[0.9]


def test_non_passkey_metrics_are_null():
    from streamkv.metrics import summarize

    pk, ids = _pk_ids(120)
    r = _eager(ids, *LAZY)[1].run(ids, 0)
    m = summarize(r)
    assert m["answer_acc"] is None and m["answer_nll"] is None and m["max_position"] == 4 + 32 + 8 - 1
    r.answer = pk.answer[1:]
    assert summarize(r)["answer_acc"] in (0, 1)


def test_summary_shows_the_new_rows(capsys):
    from streamkv.cli import print_summary

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose("model=tiny_llama", "dataset=passkey"), resolve=True)
    metrics = {"ppl": 2.0, "nll_mean": 0.7, "tpot_ms": 1.0, "ttft_ms": 1.0, "prefill_ms": 0.0, "total_s": 1.0,
               "peak_mem_mb": 1.0, "prefill_tokens": 0, "decode_tokens": 99, "visible_kv_min": 0,
               "visible_kv_mean": 1.0, "visible_kv_max": 2, "n_prunes": 0, "drop_min": 0, "drop_median": 0,
               "drop_max": 0, "tpot_p50_ms": 1.25, "tpot_p90_ms": 2.5, "tpot_steady_ms": None,
               "answer_acc": 1, "answer_nll": 0.125, "key_distance": 77, "max_position": 300, "model_context": 256}
    payload = {"status": "ok", "config": cfg, "metrics": metrics, "dataset": {"n_tokens": 100, "passkey": {"key": "123"}},
               "device": {"name": "cpu", "type": "cpu"}, "model": {"dtype": "float32"}}
    print_summary(payload, "RUN")
    out = capsys.readouterr().out
    assert "p50 1.250 ms" in out and "p90 2.500 ms" in out and "steady n/a" in out
    assert "max RoPE position 300, model context 256" in out and "BEYOND" in out
    assert "answer acc 1" in out and "distance 77" in out


# ---------------------------------------------------------------- retrieval on the real model


def test_smollm2_retrieves_with_full_attention_not_with_a_short_window(one_thread):
    """The claim the dataset rests on, at 800 tokens with the key at depth 0.2 (~600 tokens back): full
    attention retrieves the key (every answer token top-1), streaming with a 128-token window cannot."""
    from conftest import evaluate
    from streamkv.passkey import answer_metrics, build

    pk = build(load("smollm2_135m").tokenizer, 800, 0.2, seed=0)
    ids = torch.tensor(pk.ids)
    assert pk.key_distance > 128 + 4
    # full attention: a prefill of the whole text is the same computation, in one pass
    full = evaluate("smollm2_135m", ids, "policy=full", "prefill_tokens=799")
    m = answer_metrics(full.nll, full.top1, pk.answer[1:])
    assert m["answer_acc"] == 1 and m["answer_nll"] < 0.3, m
    streaming = evaluate("smollm2_135m", ids, "window=128", "progress=false")
    m = answer_metrics(streaming.nll, streaming.top1, pk.answer[1:])
    assert m["answer_acc"] == 0 and m["answer_nll"] > 1.0, m
