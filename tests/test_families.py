"""Model families as data (streamkv/backends/families.py), on the CPU in float32:

- every family's tiny model: policy=full reproduces one plain HF forward pass (1e-5 per token) on
  concat x eager and on the graph step (ring and static, un-captured, with a prefill);
- streaming (R=1, R=8; GPT-NeoX also refresh, which re-rotates sinks, and snapkv with shifted
  positions, which re-rotates queries) gives the same per-token NLL (max |dNLL| <= 1e-5, stricter than
  the 1e-4 mean of the acceptance) and the same events on concat x eager, ring and static x cudagraph
  (un-captured) and the host-driven dense blocks (what compile compiles);
- gather_weights shares storage with the HF modules and leaves the HF forward unchanged;
- model=hf on save_pretrained directories (GPT-NeoX, Qwen2) reproduces their own forward through
  the CLI; an unsupported family fails in one line before its weights load; config errors.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose, run_cli

# kind + model overrides: every family, and GPT-NeoX's variants (sequential residual, full rotary)
MODELS = {
    "llama": ("tiny_llama",),
    "mistral": ("tiny_mistral",),
    "qwen2": ("tiny_qwen2",),
    "qwen3": ("tiny_qwen3",),
    "neox": ("tiny_neox",),
    "neox_seq": ("tiny_neox", "model.parallel_residual=false"),
    "neox_full_rope": ("tiny_neox", "model.rotary_pct=1.0"),
}
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=8)
def _load(name: str):
    from streamkv.models import load_model

    kind, *model_ov = MODELS[name]
    return load_model(compose(f"model={kind}", *model_ov).model, torch.device("cpu"), torch.float32)


@functools.lru_cache(maxsize=8)
def _ids(name: str, n: int = 220) -> torch.Tensor:
    from streamkv.corpora import load_text

    return torch.tensor(_load(name).tokenizer.encode(load_text("wiki"))[:n])


def _run(name: str, *overrides: str, n: int = 220):
    from streamkv.runner import make_evaluator

    kind, *model_ov = MODELS[name]
    ids = _ids(name, n)
    cfg = compose(f"model={kind}", *model_ov, "progress=false", *overrides)
    loaded = _load(name)
    ev = make_evaluator(cfg, loaded.model, len(ids), torch.device("cpu"), loaded.tokenizer)
    return ev.run(ids, cfg.prefill_tokens), ev


def _hf_nll(name: str) -> np.ndarray:
    ids = _ids(name)
    with torch.inference_mode():
        logp = _load(name).model(ids[None]).logits[0].float().log_softmax(-1)
    return (-logp[:-1].gather(-1, ids[1:, None])[:, 0]).numpy()


def _dense_run(name: str, *overrides: str):
    """concat x the host-driven dense blocks (the compile backend's functions, not compiled)."""
    from streamkv.backends import functional as fn
    from streamkv.runner import make_evaluator

    kind, *model_ov = MODELS[name]
    ids = _ids(name)
    cfg = compose(f"model={kind}", *model_ov, "progress=false", *overrides)
    ev = make_evaluator(cfg, _load(name).model, len(ids), torch.device("cpu"), _load(name).tokenizer)
    ev.decoder.dense = fn.DenseBlocks(fn.gather_weights(_load(name).model))
    return ev.run(ids, cfg.prefill_tokens)


def test_tiny_models_are_what_they_claim():
    cfgs = {name: _load(name).model.config for name in MODELS}
    assert [cfgs[n].model_type for n in ("llama", "mistral", "qwen2", "qwen3", "neox")] == \
        ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"]
    neox = _load("neox").model
    assert cfgs["neox"].use_parallel_residual and not cfgs["neox_seq"].use_parallel_residual
    assert neox.gpt_neox.layers[0].attention.rotary_ndims == 4  # rotary_pct 0.25 of head_dim 16
    assert _load("neox_full_rope").model.gpt_neox.layers[0].attention.rotary_ndims == 16
    assert neox.gpt_neox.layers[0].attention.query_key_value.bias.abs().sum() > 0  # random biases: they matter
    attn = _load("qwen2").model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0 and attn.o_proj.bias is None
    assert hasattr(_load("qwen3").model.model.layers[0].self_attn, "q_norm")
    from streamkv.backends.families import describe

    fam = describe(neox)
    assert (fam.norm, fam.gated, fam.qkv_layout, fam.parallel_residual, fam.rotary_ndims) == \
        ("layer", False, "per_head", True, 4)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_equals_hf_forward(name):
    hf = _hf_nll(name)
    r, _ = _run(name, "policy=full")
    np.testing.assert_allclose(r.nll, hf, atol=TOL, rtol=0)
    for cache in ("ring", "static"):
        r, ev = _run(name, "policy=full", f"cache={cache}", "backend=cudagraph", "backend.capture=false",
                     "prefill_tokens=60")
        assert ev.backend_used == "cudagraph" and ev.graph is None  # the graph step, un-captured
        np.testing.assert_allclose(r.nll, hf, atol=TOL, rtol=0, err_msg=cache)


STREAMING = {
    "R1": ("window=32", "compress_every=1"),
    "R8": ("window=32", "compress_every=8", "prefill_tokens=40"),
}


@pytest.mark.parametrize("policy", list(STREAMING))
@pytest.mark.parametrize("name", list(MODELS))
def test_streaming_paths_agree(name, policy):
    ov = ("policy=streaming", *STREAMING[policy])
    ref, _ = _run(name, *ov)
    assert np.abs(ref.nll - _hf_nll(name)).max() > 1e-3  # eviction changes the result: not vacuous
    for cache in ("ring", "static"):
        r, ev = _run(name, *ov, f"cache={cache}", "backend=cudagraph", "backend.capture=false")
        assert ev.backend_used == "cudagraph"
        d = np.abs(r.nll - ref.nll)
        assert d.max() <= TOL and d.mean() <= 1e-4, (cache, d.max())
        assert r.events == ref.events and (r.visible_kv == ref.visible_kv).all(), cache
    np.testing.assert_allclose(_dense_run(name, *ov).nll, ref.nll, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["neox", "neox_seq"])
@pytest.mark.parametrize("ov", [
    ("policy=refresh", "policy.refresh_budget=4", "window=24", "compress_every=8"),  # sink/refresh re-rotation
    ("policy=snapkv", "policy.positions=shift", "window=24", "compress_every=8"),  # query re-rotation
], ids=["refresh", "snapkv_shift"])
def test_partial_rotary_rerotation(name, ov):
    """Re-rotating stored keys (ring: sinks and refreshed tokens) and SnapKV's window queries rotates
    only the first rotary_ndims dims: the graph step (ring / static) = concat x eager."""
    ref, _ = _run(name, *ov)
    layouts = ("static",) if "policy=snapkv" in ov else ("ring", "static")
    for cache in layouts:
        r, ev = _run(name, *ov, f"cache={cache}", "backend=cudagraph", "backend.capture=false")
        assert ev.backend_used == "cudagraph", ev.backend_used
        np.testing.assert_allclose(r.nll, ref.nll, atol=TOL, rtol=0, err_msg=cache)
        assert r.events == ref.events, cache


def test_ring_rerotates_partial_rotary_keys():
    """The ring layout's sink re-rotation under partial rotary: scheduled fixes exist, and the refresh run
    matches concat x eager (so the re-rotated keys are right in the rotary dims and untouched in the rest)."""
    ov = ("policy=refresh", "policy.refresh_budget=4", "window=24", "compress_every=8")
    ref, _ = _run("neox", *ov)
    r, ev = _run("neox", *ov, "cache=ring", "backend=cudagraph", "backend.capture=false")
    assert ev.n_fix > 0 and int((ev.s.fix_slot < ev.s.capacity).sum()) > 0
    np.testing.assert_allclose(r.nll, ref.nll, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "neox"])
def test_gather_weights_shares_storage(name):
    """After gather_weights the HF modules' parameters share storage with the gathered tensors (nothing
    copied) and the HF model's own forward is unchanged (bit for bit)."""
    from streamkv.backends.families import describe, gather_weights
    from streamkv.models import load_model

    kind, *model_ov = MODELS[name]
    model = load_model(compose(f"model={kind}", *model_ov).model, torch.device("cpu"), torch.float32).model
    ids = _ids(name, 64)[None]
    with torch.inference_mode():
        before = model(ids).logits.clone()
    w = gather_weights(model)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for lw in w.layers:
        for t in vars(lw).values():
            if t is not None:
                assert t.untyped_storage().data_ptr() in storages
    fam = describe(model)
    base = getattr(model, fam.base)
    layer, lw = base.layers[1], w.layers[1]
    if fam.qkv_layout == "per_head":
        assert layer.attention.query_key_value.weight.data_ptr() == lw.wqkv.data_ptr()
        assert layer.mlp.dense_h_to_4h.bias.data_ptr() == lw.bgu.data_ptr()
        assert layer.input_layernorm.bias.data_ptr() == lw.ln1_b.data_ptr()
    else:
        a = layer.self_attn
        qs = w.n_heads * w.head_dim * model.config.hidden_size
        assert a.q_proj.weight.data_ptr() == lw.wqkv.data_ptr()
        assert a.k_proj.weight.data_ptr() == lw.wqkv.data_ptr() + qs * lw.wqkv.element_size()
        assert layer.mlp.gate_proj.weight.data_ptr() == lw.wgu.data_ptr()
        if a.q_proj.bias is not None:
            assert a.q_proj.bias.data_ptr() == lw.bqkv.data_ptr()
    assert w.embed.data_ptr() == getattr(base, fam.embed).weight.data_ptr()
    assert w.lm_head.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    n_before = sum(p.numel() for p in model.parameters())
    assert gather_weights(model).layers[0].wqkv.data_ptr() == w.layers[0].wqkv.data_ptr()  # idempotent
    assert sum(p.numel() for p in model.parameters()) == n_before
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


def test_float16_attention_does_not_overflow():
    """Scores beyond float16's range before scaling (|q.k| ~ 2e5): fn.attend scales q first, so the
    result is finite and matches float32."""
    from streamkv.backends.functional import attend

    torch.manual_seed(0)
    D = 80
    q = torch.randn(1, 2, 1, D) * 60
    k = torch.randn(1, 2, 40, D) * 60
    v = torch.randn(1, 2, 40, D)
    assert (q @ k.transpose(-1, -2)).abs().max() > 65504  # the unscaled scores overflow float16
    ref = attend(q, k, v, D ** -0.5)
    out = attend(q.half(), k.half(), v.half(), D ** -0.5).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1


# ---------------------------------------------------------------- model=hf on local directories


def _byte_tokenizer(path):
    """A byte-level tokenizer (256 ids, no merges) saved as a HF tokenizer: AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("hf_models")
    dirs = {}
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(7)
    for name, model in [
        ("neox", tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, rotary_pct=0.25, initializer_range=0.1))),
        ("qwen2", tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2, initializer_range=0.1))),
        ("gpt2", tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2))),
    ]:
        with torch.no_grad():  # non-zero biases
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / name)
        _byte_tokenizer(root / name)
        dirs[name] = root / name
    return dirs


def _own_nll(path, n: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamkv.corpora import load_text

    ids = torch.tensor(AutoTokenizer.from_pretrained(path).encode(load_text("wiki"))[:n])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        logp = model(ids[None]).logits[0].float().log_softmax(-1)
    return (-logp[:-1].gather(-1, ids[1:, None])[:, 0]).numpy()


def test_hf_local_dirs_reproduce_their_forward(hf_dirs, tmp_path):
    """model=hf model.name_or_path=DIR (GPT-NeoX, Qwen2), policy=full: the per-token NLL of the model's own
    forward, on concat x eager and on static x cudagraph (un-captured), through the CLI."""
    n = 120
    paths = f"{hf_dirs['neox']},{hf_dirs['qwen2']}"
    common = ["-m", "model=hf", f"model.name_or_path={paths}", "policy=full", f"dataset.max_tokens={n}",
              "device=cpu", "dtype=float32", "progress=false"]
    for label, args in [("eager", ["cache=concat", "backend=eager"]),
                        ("graph", ["cache=static", "backend=cudagraph", "backend.capture=false"])]:
        r = run_cli(*common, *args, f"hydra.sweep.dir={tmp_path / label}", timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        for job in (tmp_path / label).glob("[0-9]*"):
            rec = json.loads((job / "result.json").read_text())
            assert rec["status"] == "ok" and rec["backend_used"] == args[1].split("=")[1]
            path = rec["config"]["model"]["name_or_path"]
            nll = pd.read_parquet(job / "tokens.parquet")["nll"].to_numpy()
            np.testing.assert_allclose(nll, _own_nll(path, n), atol=TOL, rtol=0, err_msg=f"{label} {path}")
        assert len(list((tmp_path / label).glob("[0-9]*"))) == 2


def test_unsupported_family_fails_before_loading(hf_dirs, tmp_path):
    """A GPT-2 directory: one line naming the supported families, before any weights load (the weights
    file is removed: loading would fail differently)."""
    import shutil

    d = tmp_path / "gpt2"
    shutil.copytree(hf_dirs["gpt2"], d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    r = run_cli("model=hf", f"model.name_or_path={d}", "backend=cudagraph", "cache=ring", "device=cpu",
                "backend.capture=false", timeout=120)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "'gpt2' model" in err[0] and "gpt_neox" in err[0] and "llama" in err[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, expected", [
    (["backend=cudagraph", "cache=ring"], "backend.capture=false"),  # captured on the CPU: one line, the way out
    (["backend=cudagraph_fused", "cache=ring", "backend.capture=false"], "needs a CUDA device"),
    (["backend=eager", "backend.capture=false"], "backend.capture: only the graph backends"),
    (["backend=fused", "model=tiny_neox", "device=cuda"], "backend=eager or compile or cudagraph"),
    (["backend=cudagraph_fused", "model=tiny_qwen3", "device=cuda", "cache=ring"], "is 'qwen3'"),
    (["backend=cudagraph_fused_gemv", "model=tiny_qwen3", "device=cuda", "cache=ring"], "is 'qwen3'"),
    (["backend=cudagraph_fused", "backend.gemv_max_mb=0", "device=cuda", "cache=ring"], "backend.gemv_max_mb: only"),
    (["backend=cudagraph_fused_gemv", "backend.gemv_max_mb=-1", "device=cuda", "cache=ring"], "is negative"),
    (["model=tiny_llama", "model.rotary_pct=0.5"], "model.rotary_pct: only model=tiny_neox"),
    (["model=tiny_neox", "model.rotary_pct=0"], "model.rotary_pct: must be in (0, 1]"),
    (["model=pythia", "model.dtype=float64"], "model.dtype: 'float64'"),
])
def test_config_errors(overrides, expected):
    from streamkv.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_graph_backend_on_cpu_composes_uncaptured():
    cfg = compose("model=tiny_neox", "backend=cudagraph", "backend.capture=false", "cache=ring")
    assert cfg.backend.capture is False
    for fam_model in ("tiny_neox", "tiny_qwen3", "tiny_qwen2", "tiny_mistral"):
        compose(f"model={fam_model}", "backend=compile")
    # GPT-NeoX's fused graph path (streamkv/backends/fused_neox.py) is accepted where CUDA is asked for
    assert compose("model=tiny_neox", "backend=cudagraph_fused", "device=cuda", "cache=ring").backend.name \
        == "cudagraph_fused"


def test_gather_weights_checks_neox_on_the_fused_backends():
    """GPT-NeoX on cudagraph_fused(_gemv): the family-neutral weights (biases, LayerNorm biases, partial rotary
    accepted: its fused step applies them); an activation other than the exact GELU, or a Llama-only fused
    backend, fails in one line."""
    import dataclasses

    from streamkv.backends import families

    model = _load("neox").model
    w = families.gather_weights(model, "cudagraph_fused")
    assert w.family.name == "gpt_neox" and w.layers[0].bo is not None and w.rotary_ndims < w.head_dim
    assert w.layers[0].wqkv.data_ptr() == model.gpt_neox.layers[0].attention.query_key_value.weight.data_ptr()
    assert families.gather_weights(model, "cudagraph_fused_gemv").family.name == "gpt_neox"
    with pytest.raises(NotImplementedError, match="Llama family only"):
        families.gather_weights(model, "fused")
    tanh = dataclasses.replace(w.family, hidden_act="gelu_new")
    with pytest.raises(NotImplementedError, match="exact \\(erf\\) GELU only") as err:
        families.check_backend_model(tanh, w, "cudagraph_fused")
    assert "\n" not in str(err.value)
    families.check_backend_model(tanh, w, "cudagraph")  # the PyTorch step runs any activation module


def test_gemv_size_limit_from_the_run_config():
    """backend.gemv_max_mb reaches cudagraph_fused_gemv's GemvOptions (0: every GEMV on our kernels, as the
    Pythia benchmark runs; unset: the default limit)."""
    from streamkv.backends.graph_layers import GemvOptions
    from streamkv.runner import make_evaluator

    model = _load("neox").model
    for mb, expected in [("0", None), ("2.5", int(2.5 * 2**20)), (None, GemvOptions().max_bytes)]:
        ov = [f"backend.gemv_max_mb={mb}"] if mb is not None else []
        cfg = compose("model=tiny_neox", "backend=cudagraph_fused_gemv", "cache=ring", "device=cuda", *ov)
        ev = make_evaluator(cfg, model, 64, torch.device("cpu"))
        assert ev.backend_name == "cudagraph_fused_gemv" and ev.gemv.max_bytes == expected, (mb, ev.gemv)


def test_pythia_preset_dtype():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from conftest import ROOT
    from streamkv.policies import register_configs
    from streamkv.models import resolve_dtype

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["model=pythia"])
        other = hydra_compose(config_name="config", overrides=["model=pythia", "dtype=bfloat16",
                                                                "model.name_or_path=EleutherAI/pythia-410m"])
        smol = hydra_compose(config_name="config", overrides=[])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cfg.model.name_or_path == "EleutherAI/pythia-2.8b" and cfg.dtype == "auto"
    assert resolve_dtype(cfg.dtype, cuda, cfg.model.dtype) == torch.float16
    assert resolve_dtype(cfg.dtype, cpu, cfg.model.dtype) == torch.float32
    assert resolve_dtype(other.dtype, cuda, other.model.dtype) == torch.bfloat16  # the command line wins
    assert other.model.name_or_path == "EleutherAI/pythia-410m"
    assert resolve_dtype(smol.dtype, cuda, smol.model.dtype) == torch.bfloat16  # other presets: as before


def test_identity_of_earlier_records_unchanged():
    """The new knobs at their defaults leave run identities as they were (finished sweeps stay finished)."""
    from omegaconf import OmegaConf

    from streamkv.record import run_identity

    d = OmegaConf.to_container(compose("model=tiny_llama", "backend=cudagraph", "cache=ring", "device=cuda"),
                               resolve=True)
    old = json.loads(json.dumps(d))
    for knob in ("dtype", "rotary_pct", "parallel_residual"):
        del old["model"][knob]
    del old["backend"]["capture"]
    del old["backend"]["gemv_max_mb"]
    assert run_identity(d) == run_identity(old)
    d["backend"]["capture"] = False
    assert run_identity(d) != run_identity(old)


def test_every_tiny_model_loads_its_tokenizer_offline():
    """The runner tokenizes the text before the weights load: every tiny family takes the byte tokenizer
    (no hub access)."""
    from omegaconf import OmegaConf

    from streamkv.models import TINY_FAMILY, ByteTokenizer, load_tokenizer

    for kind in TINY_FAMILY:
        assert isinstance(load_tokenizer(OmegaConf.create({"kind": kind, "name_or_path": None})), ByteTokenizer)


def test_pythia_preset_is_checked_before_loading():
    """A hub preset states its family and context (hub ids are not read offline): a backend that does not run
    GPT-NeoX fails in the precheck, and the plan's protocol (n_sink 4 + window 2048) is flagged as beyond
    Pythia's 2048 positions, both before any weights load."""
    from streamkv.validate import context_warning
    from streamkv.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose("model=pythia", "backend=fused", "device=cuda")
    assert "'gpt_neox'" in str(err.value) and "\n" not in str(err.value)
    cfg = compose("model=pythia", "backend=cudagraph_fused", "cache=ring", "device=cuda", "window=2048", "n_sink=4")
    assert "context of 2048" in (context_warning(cfg) or "")
    assert context_warning(compose("model=pythia", "device=cuda", "window=1024", "n_sink=4")) is None
