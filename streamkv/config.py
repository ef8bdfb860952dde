"""Typed config schema: one dataclass per config group, registered with Hydra's ConfigStore.

The bottom layer: it imports nothing of streamkv but errors. Checking a composed config (`validate`)
lives above the registries it asks, in streamkv/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
    # cudagraph_fused_gemv: our fused GEMVs for weights up to this many MiB (0: every weight), cuBLAS above;
    # None: GemvOptions.max_bytes (4 MiB). Pythia-2.8B's weights are all larger (docs/benchmarks.md, GPT-NeoX)
    gemv_max_mb: Optional[float] = None


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
