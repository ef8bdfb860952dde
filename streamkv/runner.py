"""One run: config -> model + text -> evaluate -> run record. Knows nothing about Hydra beyond
receiving a composed, validated config (an OmegaConf node) and a run directory."""

from __future__ import annotations

import gc
import logging
import platform
from pathlib import Path

import torch
from omegaconf import OmegaConf

from streamkv import passkey
from streamkv.backends.registry import attach_backend
from streamkv.cache import build_cache
from streamkv.corpora import load_text
from streamkv.decoder import Decoder
from streamkv.errors import ConfigError
from streamkv.evaluate import Evaluator
from streamkv.inputs import text_too_short
from streamkv.metrics import summarize
from streamkv.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from streamkv.policies import build_policy
from streamkv.record import canonical_config, git_commit, run_identity, utc_now, versions, write_result, write_tables
from streamkv.sizing import cache_sizes
from streamkv.validate import validate

log = logging.getLogger("streamkv")

# Reused across the runs of one process (a local sweep): the last model and the last text.
_MODEL_MEMO: dict = {}
_TEXT_MEMO: dict = {}


def _memo(store: dict, key, make):
    if key not in store:
        store.clear()  # keep one: a sweep over models must not hold them all in memory
        gc.collect()
        store[key] = make()
    return store[key]


def load_token_ids(dcfg, tokenizer, tokenizer_key: str) -> list[int]:
    def make():
        text = load_text(dcfg.name, path=dcfg.path)
        ids = tokenizer.encode(text)
        return ids[: dcfg.max_tokens] if dcfg.max_tokens else ids

    key = (dcfg.name, dcfg.path, dcfg.max_tokens, tokenizer_key)
    return _memo(_TEXT_MEMO, key, make)


def load_passkey(cfg, tokenizer, tokenizer_key: str):
    """dataset=passkey: the text of this run (its key depends on cfg.seed); memoized like the texts."""
    d = cfg.dataset
    key = ("passkey", d.length, d.depth, d.digits, d.filler, d.path, int(cfg.seed), tokenizer_key)
    return _memo(_TEXT_MEMO, key, lambda: passkey.build(tokenizer, int(d.length), float(d.depth), int(d.digits),
                                                        str(d.filler), int(cfg.seed), d.path))


def make_evaluator(cfg, hf_model, n_tokens: int, device: torch.device, tokenizer=None) -> Evaluator:
    """Wire decoder, cache manager and policy for one run (also used by tests and benchmarks)."""
    policy = build_policy(cfg)
    decoder = Decoder(hf_model, max_positions=n_tokens + 1)
    s = decoder.shape
    cache = build_cache(cfg.cache.name, n_layers=s.n_layers, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
                        dtype=decoder.dtype, device=device, position_mode=policy.position_mode,
                        **cache_sizes(cfg, n_tokens, policy))
    policy.attach(decoder, cache, tokenizer)
    evaluator = Evaluator(decoder, cache, policy, device, progress=cfg.get("progress", False))
    return attach_backend(cfg, evaluator, tokenizer)  # the same evaluator, or one running a CUDA graph


def plain_config(cfg) -> dict:
    return canonical_config(OmegaConf.to_container(cfg, resolve=True))


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def run_job(cfg, run_dir: Path) -> dict:
    """Run one config and write its record. Returns the result payload (status ok); raises on failure
    (the caller records the failure)."""
    validate(cfg)
    started = utc_now()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available (use device=cpu)")
    dtype = resolve_dtype(cfg.dtype, device, cfg.model.get("dtype"))
    torch.manual_seed(cfg.seed)

    mkey = (str(OmegaConf.to_container(cfg.model)), str(device), str(dtype))
    # The text first, through the tokenizer alone: a missing or too-short text fails before the weights load.
    tokenizer = _MODEL_MEMO[mkey].tokenizer if mkey in _MODEL_MEMO else load_tokenizer(cfg.model)
    tokenizer_key = getattr(tokenizer, "name_or_path", "")
    pk = load_passkey(cfg, tokenizer, tokenizer_key) if cfg.dataset.name == "passkey" else None
    ids_list = pk.ids if pk is not None else load_token_ids(cfg.dataset, tokenizer, tokenizer_key)
    if (short := text_too_short(len(ids_list), cfg.prefill_tokens, cfg.dataset.path)) is not None:
        raise short
    loaded = _memo(_MODEL_MEMO, mkey, lambda: load_model(cfg.model, device, dtype))
    ids = torch.tensor(ids_list, dtype=torch.long, device=device)
    log.info("model %s (%s), %d tokens of %s, device %s %s", cfg.model.name, loaded.info["arch"], len(ids),
             cfg.dataset.name, device, dtype)

    evaluator = make_evaluator(cfg, loaded.model, len(ids), device, loaded.tokenizer)
    evaluator.warm_up(ids, cfg.prefill_tokens, cfg.warmup_steps)
    result = evaluator.run(ids, cfg.prefill_tokens)
    if pk is not None:
        result.answer = pk.answer[1:]  # row i of the trace predicts text position i + 1
    metrics = summarize(result)
    metrics["key_distance"] = pk.key_distance if pk is not None else None
    metrics["model_context"] = getattr(loaded.model.config, "max_position_embeddings", None)

    write_tables(run_dir, result)
    payload = {
        "status": "ok", "error": None, "identity": run_identity(plain_config(cfg)), "config": plain_config(cfg),
        "metrics": metrics, "model": loaded.info,
        "backend_used": getattr(evaluator, "backend_used", cfg.backend.name),
        "dataset": {"name": cfg.dataset.name, "n_tokens": len(ids), "path": cfg.dataset.path,
                    **({"passkey": {"key": pk.key, "sentence_start": pk.sentence_start, "key_start": pk.key_start,
                                    "answer_start": pk.answer_start}} if pk is not None else {})},
        "device": device_info(device), "versions": versions(), "git_commit": git_commit(),
        "started_at": started, "finished_at": utc_now(),
    }
    write_result(run_dir, payload)
    return payload


def record_failure(cfg, run_dir: Path, exc: BaseException, started: str) -> dict:
    """Write a failed record (status, error type and message); free GPU memory for the next run."""
    kind = type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        kind = "OutOfMemoryError"
    _MODEL_MEMO.clear() if kind == "OutOfMemoryError" else None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        config = plain_config(cfg)
        identity = run_identity(config)
    except Exception:  # an unresolvable config still gets a record
        config, identity = None, None
    payload = {"status": "failed", "error": {"type": kind, "message": str(exc).strip().splitlines()[0][:500]
                                              if str(exc).strip() else kind},
               "identity": identity, "config": config, "metrics": {}, "versions": versions(),
               "git_commit": git_commit(), "started_at": started, "finished_at": utc_now()}
    write_result(run_dir, payload)
    return payload
