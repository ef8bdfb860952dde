"""The run record (docs/run-record.md): per-token and per-prune tables, then result.json, written
atomically and last so that a half-written run never looks finished; and the one reader of result.json
(`read_result`, `iter_results`) for the sweep callbacks, diagnose, the analysis and the scripts.

Reading needs no torch (the analysis runs on copied records anywhere): torch and transformers are
imported only where a record is written (`versions`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

import streamkv

SCHEMA_VERSION = 1
# Fields that do not change what a run measures: left out of its identity.
NON_IDENTITY_KEYS = ("progress", "rerun")
EVENT_COLUMNS = ["step", "dropped", "kept", "visible_before", "visible_after", "refreshed"]


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Knobs added after records existed, left out of the identity at the values that mean what runs did
# before the knob (so finished runs of earlier commits are still found): (group, knob) -> values.
LEGACY_VALUES = {("policy", "positions"): (None, "original"), ("policy", "refresh_keep"): ("fifo",),
                 ("backend", "capture"): (True,), ("backend", "gemv_max_mb"): (None,),
                 ("model", "dtype"): (None,), ("model", "family"): (None,), ("model", "context"): (None,), ("model", "rotary_pct"): (None,), ("model", "parallel_residual"): (None,),
                 **{("dataset", knob): (None,) for knob in ("length", "depth", "digits", "filler")}}


# Every policy knob of the time when all policies shared one config, at its neutral value (what a policy
# that does not take the knob runs with). Identities were defined over that shared config, so a run's
# policy is hashed with the knobs it lacks filled in from here (canonical_config): its identity is the
# one it always had. A frozen format, not the knobs' defaults (those are the policies' config dataclasses;
# tests/test_policy_configs.py checks that the two agree): a knob added to a policy later enters the
# identity as that policy's config carries it (add it to LEGACY_VALUES if earlier records ran the policy).
POLICY_KNOBS = {"max_drop": None, "overlap": 0, "refresh_budget": 0, "refresh_per_prune": None,
                "refresh_select": "uniform", "refresh_keep": "fifo", "mode": None, "extra_slack": 0,
                "entropy_window": 16, "entropy_low": 2.0, "entropy_high": 4.0, "obs_window": 8, "kernel_size": 5,
                "pooling": "avg", "recent_frac": 0.5, "positions": None}


def canonical_config(config: dict) -> dict:
    """The resolved run config with every POLICY_KNOBS knob its policy lacks at its neutral value (the
    shape of every run config recorded before each policy had its own config dataclass)."""
    policy = config.get("policy")
    if not isinstance(policy, dict):
        return config
    return {**config, "policy": {**policy, **{k: v for k, v in POLICY_KNOBS.items() if k not in policy}}}


def run_identity(config: dict) -> str:
    """sha256 of the resolved run config minus presentation-only fields (used to skip finished runs)."""
    core = {k: v for k, v in canonical_config(config).items() if k not in NON_IDENTITY_KEYS}
    for (group, knob), values in LEGACY_VALUES.items():
        if isinstance(core.get(group), dict) and knob in core[group] and core[group][knob] in values:
            core[group] = {k: v for k, v in core[group].items() if k != knob}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch  # (heavy: only a run that writes a record needs it)
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "streamkv": streamkv.__version__}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_tables(run_dir: Path, result) -> None:
    tokens = pd.DataFrame({
        "index": result.index.astype(np.int64), "token_id": result.token_id.astype(np.int64),
        "nll": result.nll.astype(np.float32), "visible_kv": result.visible_kv.astype(np.int32),
        "entropy": result.entropy.astype(np.float32)})
    if getattr(result, "step_ms", None) is not None:
        tokens["step_ms"] = result.step_ms.astype(np.float32)
    if getattr(result, "answer", None) is not None:  # dataset=passkey: the rows whose target is a key token
        tokens["answer"] = np.asarray(result.answer, dtype=bool)
    write_parquet(run_dir / "tokens.parquet", tokens)
    events = pd.DataFrame(result.events, columns=EVENT_COLUMNS).astype("int64")
    write_parquet(run_dir / "events.parquet", events)


def write_result(run_dir: Path, payload: dict) -> None:
    payload = {"schema": SCHEMA_VERSION, **payload}
    _atomic_write_bytes(run_dir / "result.json", (json.dumps(payload, indent=2, default=str) + "\n").encode())


def read_result(run_dir: Path, strict: bool = False) -> dict | None:
    """A run directory's result.json as a dict; None when it is missing or unreadable (not JSON, not a
    JSON object). strict=True raises instead (OSError, ValueError), for a caller that reports why."""
    try:
        rec = json.loads((Path(run_dir) / "result.json").read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        if strict:
            raise
        return None
    return rec


def iter_results(root: Path, pattern: str = "**/result.json") -> Iterator[tuple[Path, dict]]:
    """(run dir, record) for every readable result.json under `root` matching `pattern`, in path order."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.glob(pattern)):
        rec = read_result(path.parent)
        if rec is not None:
            yield path.parent, rec
