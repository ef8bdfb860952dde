"""Run records -> one DataFrame row per run.

Reads only the files described in docs/run-record.md (result.json through streamkv.record's reader,
.hydra/*.yaml); never imports torch or the rest of streamkv, so it works on copied results anywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

# the run record's own reader and its presentation-only keys (streamkv.record needs no torch)
from streamkv.record import NON_IDENTITY_KEYS, read_result


class AnalysisError(Exception):
    """A user-facing problem (bad CLI input, nothing to analyse); the message is one line."""


# Config groups whose `name` becomes the bare column (`policy`), other keys `policy.<knob>`.
GROUPS = ("model", "dataset", "policy", "cache", "backend")
# Leading column order of runs/summary tables; the remaining config columns follow, sorted.
LEAD = ("model", "dataset", "policy", "cache", "backend", "n_sink", "window", "compress_every",
        "prefill_tokens", "seed", "repeat", "dtype", "device")
# Per-run facts that are not config (kept next to the config columns).
INFO = ("status", "error_type", "error", "device_name", "device_type", "backend_used", "identity", "overrides",
        "git_commit", "started_at", "finished_at", "path")


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every directory under `paths` holding `.hydra/config.yaml` or `result.json`, sorted, unique.

    A run directory's own subdirectories are not searched: runs never nest.
    """
    found: set[Path] = set()
    for p in paths:
        root = Path(p)
        if not root.is_dir():
            raise AnalysisError(f"not a directory: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            if "result.json" in filenames or (d / ".hydra" / "config.yaml").is_file():
                found.add(d.resolve())
                dirnames[:] = []
            else:
                dirnames[:] = sorted(n for n in dirnames if n != ".hydra")
    return sorted((_shown(d) for d in found), key=natural_key)


def _shown(d: Path) -> Path:
    """Relative to the working directory when inside it: the tables and the report are committed, and an
    absolute path would name the machine they were made on."""
    cwd = Path.cwd().resolve()
    return d.relative_to(cwd) if d.is_relative_to(cwd) else d


def natural_key(p: Path | str) -> list:
    """Sort key that puts Hydra job dirs in numeric order (2 before 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)  # hashable and stable, so the column can be grouped on
        else:
            out[key] = v
    return out


# Knobs added after records existed (= streamkv.record.LEGACY_VALUES): dropped at the values that mean
# what earlier runs did, so records from before the knob and after it fall into the same config group.
LEGACY_VALUES = {("policy", "positions"): (None, "original"), ("policy", "refresh_keep"): ("fifo",)}
# Model fields that only shape the random tiny models (streamkv.config.ModelConfig): dropped for
# other kinds, where they are unused defaults that would read as if they described the model.
TINY_ONLY = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "max_position_embeddings", "init_seed")


def flatten_config(cfg: dict | None) -> dict[str, Any]:
    """Nested run config -> flat columns: `policy: {name: x, k: 1}` -> `policy=x`, `policy.k=1`.
    Keys that do not change what a run measures (streamkv.record.NON_IDENTITY_KEYS: progress, rerun)
    are left out, so they never split a config group."""
    flat: dict[str, Any] = {}
    cfg = dict(cfg or {})
    model = cfg.get("model")
    if isinstance(model, dict) and not str(model.get("kind", "")).startswith("tiny"):
        cfg["model"] = {k: v for k, v in model.items() if k not in TINY_ONLY}
    for (group, knob), values in LEGACY_VALUES.items():
        if isinstance(cfg.get(group), dict) and cfg[group].get(knob, values[0]) in values:
            cfg[group] = {k: v for k, v in cfg[group].items() if k != knob}
    for k, v in cfg.items():
        if k == "hydra" or k in NON_IDENTITY_KEYS:
            continue
        if k in GROUPS and isinstance(v, dict):
            v = dict(v)
            flat[k] = v.pop("name", None)
            flat.update(_flatten(v, k))
        elif isinstance(v, dict):
            flat.update(_flatten(v, k))
        else:
            flat.update(_flatten({k: v}))
    return flat


def _read_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One run directory -> (config columns, info columns, metric columns). Never raises."""
    info: dict[str, Any] = {"path": str(run_dir)}
    cfg: dict | None = None
    metrics: dict[str, Any] = {}
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    ovr = run_dir / ".hydra" / "overrides.yaml"
    if ovr.is_file():
        try:
            info["overrides"] = " ".join(str(o) for o in (_read_yaml(ovr) or []))
        except Exception:  # a damaged overrides file must not hide the run
            pass
    result = run_dir / "result.json"
    if result.is_file():
        try:
            rec = read_result(run_dir, strict=True)
        except Exception as e:
            rec = None
            info.update(status="failed", error_type="UnreadableResult", error=f"result.json: {e}")
        if rec is not None:
            info["status"] = str(rec.get("status") or "failed")
            err = rec.get("error")
            if isinstance(err, dict):
                info["error_type"] = err.get("type")
                info["error"] = err.get("message")
            elif err:
                info["error"] = str(err)
            dev = rec.get("device") or {}
            info["device_name"] = dev.get("name")
            info["device_type"] = dev.get("type")
            for k in ("backend_used", "identity", "git_commit", "started_at", "finished_at"):
                info[k] = rec.get(k)
            cfg = rec.get("config")
            m = rec.get("metrics") or {}
            metrics = {k: v for k, v in _flatten(m).items() if _is_number(v)}
    else:
        info["status"] = "incomplete"
        info["error"] = "no result.json (killed or still running)"
    if cfg is None and hydra_cfg.is_file():  # incomplete or unreadable result: fall back to Hydra's copy
        try:
            cfg = _read_yaml(hydra_cfg)
        except Exception as e:
            info.setdefault("error", f".hydra/config.yaml: {e}")
    return flatten_config(cfg if isinstance(cfg, dict) else None), info, metrics


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _tidy_column(raw: list[Any]) -> pd.Series:
    """One clean dtype per config column, decided from the raw Python values (before pandas turns
    ints with gaps into floats), so parquet accepts it and CSV prints `4`, not `4.0`."""
    vals = [v for v in raw if not _missing(v)]
    if vals and all(isinstance(v, bool) for v in vals):
        return pd.Series(raw, dtype="boolean")
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pd.Series([None if _missing(v) else v for v in raw], dtype="Int64")
    if vals and all(_is_number(v) for v in vals):
        return pd.Series([float("nan") if _missing(v) else float(v) for v in raw], dtype="float64")
    # strings, or mixed kinds (e.g. a knob that is a number in one policy and a word in another): text
    return pd.Series([None if _missing(v) else (v if isinstance(v, str) else str(v)) for v in raw], dtype="object")


def order_config_columns(cols: Iterable[str]) -> list[str]:
    """Stable column order: LEAD columns (each followed by its `<group>.<knob>` columns), then the rest sorted."""
    cols = set(cols)
    out: list[str] = []
    for c in LEAD:
        if c in cols:
            out.append(c)
        out.extend(sorted(k for k in cols if k.startswith(c + ".") and k not in out))
    out.extend(sorted(c for c in cols if c not in out))
    return out


def collect(paths: Iterable[str | os.PathLike]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Scan `paths` -> (runs DataFrame, config column names, metric column names).

    Rows are sorted by path (numbers numerically), columns by a fixed order, so the same inputs give the same table.
    """
    dirs = find_run_dirs(paths)
    if not dirs:
        raise AnalysisError("no run directories (with .hydra/config.yaml or result.json) under "
                            + ", ".join(str(p) for p in paths))
    rows, cfg_cols, met_cols = [], set(), set()
    for d in dirs:
        cfg, info, metrics = load_run(d)
        cfg_cols.update(cfg)
        met_cols.update(metrics)
        rows.append((cfg, info, metrics))
    cfg_order = order_config_columns(cfg_cols)
    taken = set(cfg_order) | set(INFO)
    # A metric named like a config/info column (prefill_tokens) gets a prefix instead of clobbering it.
    met_names = {m: (f"metric.{m}" if m in taken else m) for m in met_cols}
    records = []
    for cfg, info, metrics in rows:
        r = {c: cfg.get(c) for c in cfg_order}
        r.update({c: info.get(c) for c in INFO})
        r.update({met_names[m]: metrics.get(m) for m in met_cols})
        records.append(r)
    met_order = sorted(met_names.values())
    cols: dict[str, pd.Series] = {c: _tidy_column([r[c] for r in records]) for c in cfg_order}
    cols.update({c: pd.Series([r[c] for r in records], dtype="object") for c in INFO})
    cols.update({c: pd.Series([r[c] for r in records], dtype="float64") for c in met_order})
    return pd.DataFrame(cols, columns=cfg_order + list(INFO) + met_order), cfg_order, met_order


def write_runs(df: pd.DataFrame, out: Path) -> None:
    df.to_parquet(out / "runs.parquet", index=False)
    df.to_csv(out / "runs.csv", index=False, float_format="%.10g", lineterminator="\n")
