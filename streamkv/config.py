"""Typed config schema (one dataclass per config group) and validation.

Nothing here loads a model or data: `validate` runs before anything heavy, so a bad value fails
in seconds with one line naming the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


from streamkv.errors import ConfigError  # noqa: F401  (re-exported: most callers import it from here)


@dataclass
class ModelConfig:
    name: str = MISSING  # the preset's name, recorded in the run record
    # kind: gguf (a GGUF file converted once to a local HF dir), hf (hub id or local dir),
    # tiny_llama / tiny_neox (random weights from a transformers config, byte-level tokenizer)
    kind: str = "hf"
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    # tiny random models only
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    init_seed: int = 1234


@dataclass
class DatasetConfig:
    name: str = MISSING  # wiki | book | text_file | wikitext | pg19
    max_tokens: Optional[int] = None
    path: Optional[str] = None  # text_file only


@dataclass
class CacheConfig:
    name: str = "concat"


@dataclass
class PolicyConfig:
    name: str = "streaming"
    # knobs of the controlled policies (issue 3); ignored by full/streaming when at defaults
    max_drop: Optional[int] = None
    overlap: int = 0
    refresh_budget: int = 0
    refresh_select: str = "uniform"
    mode: Optional[str] = None
    extra_slack: int = 0


@dataclass
class BackendConfig:
    name: str = "eager"


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    cache: CacheConfig = MISSING
    policy: PolicyConfig = MISSING
    backend: BackendConfig = MISSING
    n_sink: int = 4
    window: int = 2048
    compress_every: int = 1  # R: prune when the cache exceeds n_sink + window + R - 1
    prefill_tokens: int = 0  # tokens fed in one forward pass before token-by-token decode
    seed: int = 0
    repeat: int = 0  # only labels repeated runs of one config (timing medians)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    warmup_steps: int = 8  # decode steps run (and discarded) before timing
    progress: bool = True


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in [("model", ModelConfig), ("dataset", DatasetConfig), ("cache", CacheConfig),
                        ("policy", PolicyConfig), ("backend", BackendConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)


MODEL_KINDS = ("gguf", "hf", "tiny_llama", "tiny_neox")
DATASETS = ("wiki", "book", "text_file", "wikitext", "pg19")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Any) -> None:
    """Check a composed run config; raise ConfigError with a one-line message on the first problem."""
    _need(cfg.model.kind in MODEL_KINDS, f"model.kind: '{cfg.model.kind}' is not one of {', '.join(MODEL_KINDS)}")
    if cfg.model.kind == "hf":
        _need(bool(cfg.model.name_or_path), "model.name_or_path: required for model=hf (a hub id or a local directory)")
    _need(cfg.dataset.name in DATASETS, f"dataset.name: '{cfg.dataset.name}' is not one of {', '.join(DATASETS)}")
    if cfg.dataset.name == "text_file":
        _need(bool(cfg.dataset.path), "dataset.path: required for dataset=text_file (a UTF-8 text file)")
    if cfg.dataset.max_tokens is not None:
        _need(cfg.dataset.max_tokens >= 2, f"dataset.max_tokens: must be >= 2 (got {cfg.dataset.max_tokens})")
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
