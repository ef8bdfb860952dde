"""Reference configs a config is compared with: the `--baseline`, the dense run (policy=full) and strict
StreamingLLM (policy=streaming, compress_every=1); and `beyond_context`, the runs whose RoPE positions
reach past the model's trained context.

A dense run keeps every token, so its window, n_sink and compress_every mean nothing: it is matched on
the model, the text (dataset and every `dataset.*` field: length, depth, max_tokens, ...) and the device,
never on the window or R.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .select import matches

DENSE = {"policy": "full"}
STRICT = {"policy": "streaming", "compress_every": "1"}
# `group.*` stands for every column of that group (dataset.length, dataset.depth, dataset.max_tokens, ...).
DENSE_MATCH = ("model", "dataset", "dataset.*", "device_name")
# Knobs that do not change what a run without eviction computes: never matched, never used to narrow.
DENSE_FREE = ("n_sink", "window", "compress_every", "prefill_tokens")
# Columns that describe the method being compared (they may differ from the baseline's).
METHOD_PREFIXES = ("policy", "cache", "backend", "compress_every")


def is_dense(spec: dict[str, str]) -> bool:
    return spec.get("policy") == DENSE["policy"]


def is_method(col: str) -> bool:
    return any(col == p or col.startswith(p + ".") for p in METHOD_PREFIXES)


def expand(cols, available) -> list[str]:
    """`dataset.*` -> the available `dataset.<field>` columns (sorted); other names kept if available."""
    out: list[str] = []
    for c in cols:
        if c.endswith(".*"):
            out += sorted(a for a in available if a.startswith(c[:-1]) and a not in out)
        elif c in available and c not in out:
            out.append(c)
    return out


def find(keys: pd.DataFrame, i: int, base_idx: list[int], match: list[str],
         context: list[str]) -> tuple[int | None, str | None]:
    """Index of row i's reference among `base_idx`, or (None, reason). Never guesses between several."""
    cand = [j for j in base_idx if all(keys.at[j, k] == keys.at[i, k] for k in match)]
    if len(cand) > 1:
        # Several references share the match keys (e.g. a dtype sweep): take the one equal on the
        # remaining non-method config columns too, if exactly one is.
        narrowed = [j for j in cand if all(keys.at[j, k] == keys.at[i, k] for k in context)]
        if len(narrowed) == 1:
            return narrowed[0], None
        return None, f"{len(cand)} baseline configs match (ambiguous; add keys with --match)"
    if not cand:
        return None, "no baseline config"
    return cand[0], None


def match_all(t: pd.DataFrame, keys: pd.DataFrame, group_cols: list[str], spec: dict[str, str],
              match: list[str]) -> tuple[list[int | None], dict[str, list[int]]]:
    """Each row's reference row (or None) under `spec`, and {reason: rows} for the rows without one."""
    free = DENSE_FREE if is_dense(spec) else ()
    context = [c for c in group_cols if c not in match and c not in spec and not is_method(c) and c not in free]
    base_idx = list(t.index[matches(t, spec)])
    refs: list[int | None] = []
    missing: dict[str, list[int]] = {}
    for i in t.index:
        j, why = find(keys, i, base_idx, match, context)
        refs.append(j)
        if j is None:
            where = ", ".join(f"{k}={keys.at[i, k]}" for k in match)
            missing.setdefault(f"{why} for {where}", []).append(i)
    return refs, missing


def pick(t: pd.DataFrame, refs: list[int | None], col: str) -> np.ndarray:
    return np.array([t.at[j, col] if j is not None else np.nan for j in refs], dtype=float)


def add_reference(t: pd.DataFrame, keys: pd.DataFrame, group_cols: list[str], name: str, spec: dict[str, str],
                  match: list[str]) -> None:
    """Columns `<name>_ppl_median`, `ppl_increase_vs_<name>_pct` and `<name>_beyond_context` (in place)."""
    refs, _ = match_all(t, keys, group_cols, spec, match)
    t[f"{name}_ppl_median"] = pick(t, refs, "ppl_median")
    t[f"ppl_increase_vs_{name}_pct"] = 100.0 * (t["ppl_median"] / t[f"{name}_ppl_median"] - 1.0)
    bc = t["beyond_context"] if "beyond_context" in t else pd.Series(pd.NA, index=t.index, dtype="boolean")
    t[f"{name}_beyond_context"] = pd.array([bc.at[j] if j is not None else pd.NA for j in refs], dtype="boolean")


def beyond_context(df: pd.DataFrame, max_col: str = "max_position", ctx_col: str = "model_context") -> pd.Series:
    """True where the largest RoPE position reaches the model's max_position_embeddings; NA when either
    is unknown (records from before these metrics)."""
    if max_col not in df or ctx_col not in df:
        return pd.Series(pd.NA, index=df.index, dtype="boolean")
    mp = pd.to_numeric(df[max_col], errors="coerce")
    ctx = pd.to_numeric(df[ctx_col], errors="coerce")
    out = pd.Series(pd.array(mp >= ctx, dtype="boolean"), index=df.index)
    out[mp.isna() | ctx.isna()] = pd.NA
    return out


def config_beyond_context(g: pd.DataFrame) -> object:
    """A config is beyond its context when any of its runs is; NA when no run says."""
    v = beyond_context(g).dropna()
    return pd.NA if v.empty else bool(v.any())
