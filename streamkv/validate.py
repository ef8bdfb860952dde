"""Checking a composed run config before anything heavy loads: a bad value fails in seconds with one
line naming the field and what is allowed. The top layer (command line, runner): it asks each
registry (policies, cache managers, backends, model families) to check its own group."""

from __future__ import annotations

from typing import Any, Optional

from streamkv.backends.registry import check_backend
from streamkv.cache import check_cache
from streamkv.errors import ConfigError
from streamkv.inputs import check_inputs, check_known_keys
from streamkv.models import check_model_family, known_context
from streamkv.policies import build_policy, check_policy
from streamkv.sizing import policy_bound

MODEL_KINDS = ("gguf", "hf", "tiny_llama", "tiny_mistral", "tiny_qwen2", "tiny_qwen3", "tiny_neox")
DATASETS = ("wiki", "book", "text_file", "wikitext", "pg19", "passkey")
PASSKEY_FILLERS = ("repeat", "book", "wiki", "text_file")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Any) -> None:
    """Check a composed run config; raise ConfigError with a one-line message on the first problem."""
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
    check_policy(cfg)
    check_cache(cfg, policy_bound(cfg))  # a cache manager is sized by numbers, never by asking the policy
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
