"""Typed config schema: one dataclass per config group, registered with Hydra's ConfigStore.

The bottom layer: it imports nothing of streamkv but errors. Checking a composed config (`validate`)
lives above the registries it asks, in streamkv/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from streamkv.errors import ConfigError  # noqa: F401  (re-exported for callers that import it from here)


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
    """Every policy knob (docs/policies.md). Defaults are neutral: a knob at its default is off, so
    `policy.<knob>=` composes onto any preset; validation rejects a knob the preset does not take."""

    name: str = "streaming"
    # lazy-streaming pieces (streaming / max_drop / overlap / refresh / adaptive)
    max_drop: Optional[int] = None  # cap on tokens dropped per prune; larger overflows prune over several steps
    overlap: int = 0  # extra recent tokens kept by each prune (< compress_every): drops R - overlap per prune
    refresh_budget: int = 0  # size of the dynamic sink region fed from evicted segments (0 = off)
    refresh_per_prune: Optional[int] = None  # M: tokens refreshed per prune (None = refresh_budget)
    refresh_select: str = "uniform"  # uniform | structural | entropy | attention
    refresh_keep: str = "fifo"  # which refresh tokens stay when the region is full: fifo (oldest leave) | score
    mode: Optional[str] = None  # adaptive trigger: slack | entropy (None = the fixed period compress_every)
    extra_slack: int = 0  # adaptive: the cache may exceed n_sink + window by this many tokens
    entropy_window: int = 16  # adaptive entropy: steps averaged into the "recent entropy"
    entropy_low: float = 2.0  # nats: at or below, the cache may grow to the full extra_slack
    entropy_high: float = 4.0  # nats: at or above, prune at once (no slack); linear in between
    # score-based baselines (snapkv / h2o / tova); obs_window / kernel_size / pooling also score the
    # refresh policy's refresh_select=attention
    obs_window: int = 8  # snapkv: recent queries that score the cache (and recent tokens always kept)
    kernel_size: int = 5  # snapkv: 1D pooling kernel over the scores (odd)
    pooling: str = "avg"  # snapkv: avg | max
    recent_frac: float = 0.5  # h2o: share of the window kept as the recent window (rest: heavy hitters)
    # snapkv / h2o / tova: RoPE positions of the kept tokens: original (each keeps its text position, as
    # kvpress; the presets' value) | shift (StreamingLLM: contiguous positions in cache order).
    # null = the policy's own (original for these; the other policies always shift and take no value)
    positions: Optional[str] = None


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
    policy: PolicyConfig = MISSING
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
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in [("model", ModelConfig), ("dataset", DatasetConfig), ("cache", CacheConfig),
                        ("policy", PolicyConfig), ("backend", BackendConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)
