"""Typed config schema (one dataclass per config group) and validation.

Nothing here loads a model or data: `validate` runs before anything heavy, so a bad value fails
in seconds with one line naming the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from streamkv.errors import ConfigError  # noqa: F401  (re-exported: most callers import it from here)


@dataclass
class ModelConfig:
    name: str = MISSING  # the preset's name, recorded in the run record
    # kind: gguf (a GGUF file converted once to a local HF dir), hf (hub id or local dir),
    # tiny_llama / tiny_mistral / tiny_qwen2 / tiny_qwen3 / tiny_neox (random weights from a transformers
    # config, byte-level tokenizer)
    kind: str = "hf"
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    # the dtype `dtype=auto` resolves to on CUDA (null: bfloat16); pythia: float16, as it was trained
    dtype: Optional[str] = None
    # a hub preset's facts, known before loading (hub ids are not read offline): the HF model_type (checked
    # against the backend's families in the precheck) and max_position_embeddings (the context warning);
    # a local directory's config.json wins over both
    family: Optional[str] = None
    context: Optional[int] = None
    # tiny random models only
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    init_seed: int = 1234
    # tiny_neox only (null: its defaults, rotary_pct 0.25 and a parallel residual)
    rotary_pct: Optional[float] = None
    parallel_residual: Optional[bool] = None


@dataclass
class DatasetConfig:
    name: str = MISSING  # wiki | book | text_file | wikitext | pg19 | passkey
    max_tokens: Optional[int] = None
    path: Optional[str] = None  # text_file (and passkey with filler=text_file) only
    # passkey only (streamkv/passkey.py; null elsewhere, where they are ignored)
    length: Optional[int] = None  # tokens of the whole text (filler + key sentence + question + answer)
    depth: Optional[float] = None  # where the key sentence sits in the filler, 0..1
    digits: Optional[int] = None  # digits of the key
    filler: Optional[str] = None  # repeat | book | wiki | text_file


@dataclass
class CacheConfig:
    name: str = "concat"
    # preallocating managers (ring / static / soft_ring): tokens held at most; null = the policy's bound
    capacity: Optional[int] = None


@dataclass
class PolicyConfig:
    """The base of every policy's own config dataclass. Each policy module in streamkv.policies defines
    one (its knobs as fields, their defaults there and nowhere else; docs/policies.md), registered as
    the structured config `policy/<name>_schema` that conf/policy/<name>.yaml lists in its defaults."""

    name: str = MISSING


@dataclass
class BackendConfig:
    name: str = "eager"
    # graph backends: capture the step as a CUDA graph; false = the same step run un-captured (any
    # device: `backend=cudagraph backend.capture=false device=cpu`)
    capture: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    cache: CacheConfig = MISSING
    # the chosen policy's own dataclass (a PolicyConfig subclass, from conf/policy/<name>.yaml); its keys
    # are checked by streamkv.policies.check_policy, which names the policy that takes a stray knob
    policy: Any = MISSING
    backend: BackendConfig = MISSING
    n_sink: int = 4
    window: int = 2048
    compress_every: int = 1  # R: prune when the cache exceeds n_sink + window + R - 1
    prefill_tokens: int = 0  # tokens fed in one forward pass before token-by-token decode
    seed: int = 0
    repeat: int = 0  # only labels repeated runs of one config (timing medians)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU; on CUDA model.dtype, else bfloat16) | float32 | bfloat16 | float16
    warmup_steps: int = 8  # decode steps run (and discarded) before timing
    progress: bool = True
    rerun: bool = False  # run even if an ok record of this exact config exists in the sweep dir


def register_configs() -> None:
    """The run schema and its groups' schemas. The policy group's nodes (one per policy) are registered by
    streamkv.policies.register_configs, which calls this first."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in [("model", ModelConfig), ("dataset", DatasetConfig), ("cache", CacheConfig),
                        ("backend", BackendConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)


MODEL_KINDS = ("gguf", "hf", "tiny_llama", "tiny_mistral", "tiny_qwen2", "tiny_qwen3", "tiny_neox")
DATASETS = ("wiki", "book", "text_file", "wikitext", "pg19", "passkey")
PASSKEY_FILLERS = ("repeat", "book", "wiki", "text_file")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Any) -> None:
    """Check a composed run config; raise ConfigError with a one-line message on the first problem."""
    from streamkv.inputs import check_inputs, check_known_keys

    check_known_keys(cfg)  # `+key=...` adds keys the schema lacks: a typo must not pass silently
    _need(cfg.model.kind in MODEL_KINDS, f"model.kind: '{cfg.model.kind}' is not one of {', '.join(MODEL_KINDS)}")
    if cfg.model.kind == "hf":
        _need(bool(cfg.model.name_or_path), "model.name_or_path: required for model=hf (a hub id or a local directory)")
    _need(cfg.model.get("dtype") in (None,) + DTYPES[1:],
          f"model.dtype: '{cfg.model.get('dtype')}' is not one of {', '.join(DTYPES[1:])} (or null)")
    for knob in ("rotary_pct", "parallel_residual"):
        _need(cfg.model.get(knob) is None or cfg.model.kind == "tiny_neox",
              f"model.{knob}: only model=tiny_neox takes it (model.kind={cfg.model.kind})")
    if cfg.model.get("rotary_pct") is not None:
        _need(0 < cfg.model.rotary_pct <= 1, f"model.rotary_pct: must be in (0, 1] (got {cfg.model.rotary_pct})")
    from streamkv.models import check_model_family

    check_model_family(cfg.model, cfg.backend.name)
    _need(cfg.dataset.name in DATASETS, f"dataset.name: '{cfg.dataset.name}' is not one of {', '.join(DATASETS)}")
    if cfg.dataset.name == "text_file":
        _need(bool(cfg.dataset.path), "dataset.path: required for dataset=text_file (a UTF-8 text file)")
    if cfg.dataset.max_tokens is not None:
        _need(cfg.dataset.max_tokens >= 2, f"dataset.max_tokens: must be >= 2 (got {cfg.dataset.max_tokens})")
    _check_passkey(cfg.dataset)
    _need(cfg.window >= 1, f"window: must be >= 1 (got {cfg.window})")
    _need(cfg.n_sink >= 0, f"n_sink: must be >= 0 (got {cfg.n_sink})")
    _need(cfg.compress_every >= 1, f"compress_every: must be >= 1 (got {cfg.compress_every})")
    _need(cfg.prefill_tokens >= 0, f"prefill_tokens: must be >= 0 (got {cfg.prefill_tokens})")
    _need(cfg.warmup_steps >= 0, f"warmup_steps: must be >= 0 (got {cfg.warmup_steps})")
    _need(cfg.repeat >= 0, f"repeat: must be >= 0 (got {cfg.repeat})")
    _need(cfg.dtype in DTYPES, f"dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    dev = str(cfg.device)
    _need(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
          f"device: '{dev}' is not one of auto, cpu, cuda, cuda:N")
    # each registry checks its own group (names and knobs): one place per concept
    from streamkv.backends import check_backend
    from streamkv.cache import check_cache
    from streamkv.policies import check_policy

    check_policy(cfg)
    check_cache(cfg)
    check_backend(cfg)
    if cfg.dataset.max_tokens is not None:
        _need(cfg.prefill_tokens < cfg.dataset.max_tokens,
              f"prefill_tokens: must be < dataset.max_tokens ({cfg.prefill_tokens} >= {cfg.dataset.max_tokens})")
    if cfg.dataset.name == "passkey":
        _need(cfg.prefill_tokens < cfg.dataset.length,
              f"prefill_tokens: must be < dataset.length ({cfg.prefill_tokens} >= {cfg.dataset.length})")

    check_inputs(cfg)  # the file system last: the text file, a local model directory


def _check_passkey(d) -> None:
    """The passkey knobs (their ranges whenever set; required for dataset=passkey)."""
    if d.name == "passkey":
        for knob in ("length", "depth", "digits", "filler"):
            _need(d.get(knob) is not None, f"dataset.{knob}: required for dataset=passkey")
        _need(d.max_tokens is None, f"dataset.max_tokens: dataset=passkey takes dataset.length instead "
                                    f"(got max_tokens={d.max_tokens})")
    if d.get("length") is not None:
        _need(d.length >= 64, f"dataset.length: must be >= 64 tokens (got {d.length})")
    if d.get("depth") is not None:
        _need(0 <= d.depth <= 1, f"dataset.depth: must be between 0 and 1 (got {d.depth})")
    if d.get("digits") is not None:
        _need(1 <= d.digits <= 12, f"dataset.digits: must be between 1 and 12 (got {d.digits})")
    if d.get("filler") is not None:
        _need(d.filler in PASSKEY_FILLERS,
              f"dataset.filler: '{d.filler}' is not one of {', '.join(PASSKEY_FILLERS)}")
        if d.name == "passkey" and d.filler == "text_file":
            _need(bool(d.path), "dataset.path: required for dataset.filler=text_file (a UTF-8 text file)")


def context_warning(cfg) -> Optional[str]:
    """One line if this run can put a query beyond the model's trained context (positions 0 ..
    max_position_embeddings - 1), else None (also when the context or the text length is unknown before
    loading). A warning, not an error: running past the context is what some experiments measure."""
    from streamkv.cache import policy_bound
    from streamkv.models import known_context
    from streamkv.policies import build_policy

    context = known_context(cfg.model)
    if context is None:
        return None
    d = cfg.dataset
    n = d.length if d.name == "passkey" else d.max_tokens  # tokens of the text, at most (None: unknown)
    policy = build_policy(cfg)
    bound = policy_bound(cfg, policy)  # tokens held during a step; None: the whole text
    if policy.position_mode == "shift" and bound is not None:
        top = max(bound, cfg.prefill_tokens) - 1  # the query's cache-order index
        if n is not None:
            top = min(top, n - 2)
        what = f"StreamingLLM positions up to {top} (a cache of up to {max(bound, cfg.prefill_tokens)} tokens)"
    elif n is not None:
        top = n - 2  # the last token is only predicted, never fed
        what = f"text positions up to {top} ({n}-token text, policy={cfg.policy.name} keeps original positions)"
    else:
        return None
    if top < context:
        return None
    return f"model {cfg.model.name} has a context of {context} positions; this run uses {what}"
