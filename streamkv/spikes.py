"""NLL spikes around prunes (Phase A): is the quality loss of lazy pruning a spike right after each
prune boundary, or a drift of the effective window between prunes? numpy only (reads records,
never the model).

Conventions (docs/run-record.md): row j of the per-token arrays predicts text position index[j]
from the step whose input was position index[j] - 1. A prune event at `step` s happens after the
step whose input was s, so the first step that sees the pruned cache has input s + 1: the k rows
after a prune are the steps with inputs s+1 .. s+k.

Excess NLL of a row = its NLL minus a reference:
  * a reference run (same text, e.g. strict streaming R=1 with the same n_sink + window): that
    run's NLL of the same token (the cleanest: the token's own difficulty cancels);
  * else the mean NLL over the `baseline_window` rows before the prune (per prune), or before the
    row (for the by-age table).
Per prune, over its k following rows: peak = max excess, width = rows with excess > threshold,
area = sum of excess (signed, so that noise averages out).
"""

from __future__ import annotations

import numpy as np

SPIKE_K = 32  # rows after a prune that belong to its spike
SPIKE_THRESHOLD = 1.0  # nats of excess that count toward a spike's width
BASELINE_WINDOW = 256  # rows before a prune whose mean NLL is the no-reference baseline


def prune_steps(events) -> np.ndarray:
    """`step` of each prune, from the event list (EvalResult.events) or an events DataFrame."""
    if events is None:
        return np.zeros(0, dtype=np.int64)
    if hasattr(events, "columns"):
        return events["step"].to_numpy(dtype=np.int64) if len(events) else np.zeros(0, dtype=np.int64)
    return np.array([e["step"] for e in events], dtype=np.int64)


def _trailing_mean(nll: np.ndarray, rows: np.ndarray, window: int) -> np.ndarray:
    """Mean of nll[max(0, r - window):r] for each r in rows (NaN where empty)."""
    c = np.concatenate([[0.0], np.cumsum(nll, dtype=np.float64)])
    lo = np.maximum(rows - window, 0)
    n = rows - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (c[rows] - c[lo]) / np.maximum(n, 1), np.nan)


def spike_table(nll, index, steps, k: int = SPIKE_K, reference=None, threshold: float = SPIKE_THRESHOLD,
                baseline_window: int = BASELINE_WINDOW) -> dict:
    """One entry per prune that has at least one following row (and a baseline): arrays
    step, rows (how many following rows were used, <= k), peak, width, area, baseline."""
    nll = np.asarray(nll, dtype=np.float64)
    index = np.asarray(index, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    first_input = int(index[0]) - 1 if len(index) else 0
    rows = steps + 1 - first_input  # row of the first step after the prune
    ok = (rows >= 0) & (rows < len(nll))
    steps, rows = steps[ok], rows[ok]
    pad = np.concatenate([nll, np.full(k, np.nan)])
    win = np.lib.stride_tricks.sliding_window_view(pad, k)[rows] if len(rows) else np.zeros((0, k))
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != nll.shape:
            raise ValueError(f"reference has {len(ref)} tokens, the run {len(nll)}: not the same text")
        rwin = np.lib.stride_tricks.sliding_window_view(np.concatenate([ref, np.full(k, np.nan)]), k)[rows] \
            if len(rows) else np.zeros((0, k))
        excess = win - rwin
        base = np.nanmean(rwin, axis=1) if len(rows) else np.zeros(0)
    else:
        base = _trailing_mean(nll, rows, baseline_window)
        excess = win - base[:, None]
    keep = ~np.isnan(base) if reference is None else np.ones(len(rows), dtype=bool)
    excess, steps, rows, base = excess[keep], steps[keep], rows[keep], base[keep]
    valid = ~np.isnan(excess)
    ex0 = np.where(valid, excess, 0.0)
    return {
        "step": steps,
        "rows": valid.sum(1),
        "peak": np.where(valid, excess, -np.inf).max(1) if len(steps) else np.zeros(0),
        "width": (ex0 > threshold).sum(1),
        "area": ex0.sum(1),
        "baseline": base,
    }


def spike_metrics(nll, index, events, k: int = SPIKE_K, reference=None, threshold: float = SPIKE_THRESHOLD) -> dict:
    """Metrics keys: spike_{peak,width,area}_{mean,max} over prunes (0.0 without prunes), spike_k,
    spike_n (prunes measured)."""
    t = spike_table(nll, index, prune_steps(events), k=k, reference=reference, threshold=threshold)
    out = {"spike_k": k, "spike_n": int(len(t["step"]))}
    for name in ("peak", "width", "area"):
        v = np.asarray(t[name], dtype=np.float64)
        out[f"spike_{name}_mean"] = float(v.mean()) if len(v) else 0.0
        out[f"spike_{name}_max"] = float(v.max()) if len(v) else 0.0
    return out


def token_ages(index, steps) -> np.ndarray:
    """Tokens since the last prune for each row (1 = the first step after a prune); -1 before the
    first prune."""
    inputs = np.asarray(index, dtype=np.int64) - 1
    steps = np.sort(np.asarray(steps, dtype=np.int64))
    j = np.searchsorted(steps, inputs, side="left") - 1  # last prune with step < input
    return np.where(j >= 0, inputs - steps[np.maximum(j, 0)], -1)


def excess_by(nll, index, steps, key: np.ndarray, reference=None, baseline_window: int = BASELINE_WINDOW,
              rows_mask=None) -> dict:
    """Mean excess NLL grouped by `key` (e.g. token_ages(...) or the visible length), over rows
    after the first prune. Excess: vs the reference run, else vs the mean of the previous
    baseline_window rows. Returns {"key", "excess_mean", "n"} arrays, key ascending."""
    nll = np.asarray(nll, dtype=np.float64)
    if reference is not None:
        excess = nll - np.asarray(reference, dtype=np.float64)
    else:
        excess = nll - _trailing_mean(nll, np.arange(len(nll)), baseline_window)
    ages = token_ages(index, steps)
    m = (ages >= 1) & ~np.isnan(excess)
    if rows_mask is not None:
        m &= rows_mask
    key = np.asarray(key)[m]
    excess = excess[m]
    if not len(key):
        return {"key": np.zeros(0, dtype=np.int64), "excess_mean": np.zeros(0), "n": np.zeros(0, dtype=np.int64)}
    uniq, inv = np.unique(key, return_inverse=True)
    n = np.bincount(inv)
    return {"key": uniq, "excess_mean": np.bincount(inv, weights=excess) / n, "n": n}


def reference_nll(ref_dir, index, token_id) -> np.ndarray:
    """NLL of a reference run (its run directory's tokens.parquet) for the rows `index`/`token_id`
    of this run, e.g. for `streamkv.metrics.summarize(result, reference=...)`. Raises ValueError
    (one line) if the reference does not cover the same text."""
    from pathlib import Path

    import pandas as pd

    path = Path(ref_dir) / "tokens.parquet"
    if not path.is_file():
        raise ValueError(f"reference {ref_dir}: no tokens.parquet (not a finished run directory)")
    ref = pd.read_parquet(path, columns=["index", "token_id", "nll"])
    run = pd.DataFrame({"index": np.asarray(index, dtype=np.int64), "token_id": np.asarray(token_id, dtype=np.int64)})
    m = run.merge(ref, on="index", how="left", suffixes=("", "_ref"))
    if m["nll"].isna().any():
        raise ValueError(f"reference {ref_dir}: covers {len(ref)} tokens, the run {len(run)}: not the same text")
    if (m["token_id"] != m["token_id_ref"]).any():
        raise ValueError(f"reference {ref_dir}: other token ids at the same positions: not the same text")
    return m["nll"].to_numpy(dtype=np.float64)
