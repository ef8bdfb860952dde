"""Runs -> one row per config: medians over repeats, PPL increase and speedup vs a baseline, Pareto flag."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import references as ref
from .select import NA, check_columns, matches, norm, norm_series

# Metrics summarised per config (median, min, max); the names already carry their unit.
METRICS = ("tpot_ms", "ttft_ms", "prefill_ms", "total_s", "ppl", "peak_mem_mb")
# Newer metrics, summarised only where some run has them (older records lack them): per-step TPOT
# percentiles and the steady-state TPOT as medians; pass-key outcomes as means over seeds (answer_acc is
# 0/1, so its mean is the retrieval rate); the positions used and the model's context as the max.
OPTIONAL_MEDIAN = ("tpot_p50_ms", "tpot_p90_ms", "tpot_steady_ms", "key_distance")
OPTIONAL_MEAN = ("answer_acc", "answer_nll")
OPTIONAL_MAX = ("max_position", "model_context")
# Not part of a config's identity: repeat/seed only label repetitions, progress is cosmetic, and the
# model files' location differs between machines while `model` (the preset name) identifies the model.
DEFAULT_IGNORE = ("repeat", "seed", "progress", "model.name_or_path", "model.gguf_file")
DEFAULT_BASELINE = "policy=streaming,compress_every=1"
DEFAULT_MATCH = ("model", "dataset", "n_sink", "window", "device_name")
DEFAULT_PARETO_BY = ("model", "dataset", "device_name")
# A config whose repeats' TPOT max/min exceeds this is flagged: its median is not a stable speed (host-driven
# eager decode on an H100 measured 24 and 47 ms/token for the same config in consecutive runs).
TPOT_SPREAD_WARN = 1.2
METHOD_PREFIXES = ref.METHOD_PREFIXES


@dataclass
class Summary:
    table: pd.DataFrame
    group_cols: list[str]
    warnings: list[str] = field(default_factory=list)
    baseline: dict[str, str] = field(default_factory=dict)
    match: list[str] = field(default_factory=list)
    pareto_by: list[str] = field(default_factory=list)


def group_columns(runs: pd.DataFrame, cfg_cols: list[str], group_by: list[str] | None = None,
                  ignore: tuple[str, ...] | list[str] = DEFAULT_IGNORE) -> list[str]:
    """The columns that define a config: --group-by if given, else every config column but `ignore`.

    device_name and backend_used (the path that really ran: a graph backend falls back to eager for a
    policy it cannot precompute) are included by default: timings from different hardware or decode
    paths are never pooled.
    """
    if group_by:
        check_columns(runs, group_by, "--group-by")
        return list(group_by)
    ok = runs[runs["status"] == "ok"]
    ok = ok if len(ok) else runs  # no ok run: the (empty) summary still gets sensible columns
    cols = [c for c in cfg_cols if c not in ignore and ok[c].notna().any()]
    return cols + ["device_name"] + (["backend_used"] if "backend_used" in ok and ok["backend_used"].notna().any() else [])


_is_method = ref.is_method


def sort_table(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Sort by `cols` with missing values last; a stable sort keeps ties in their (path) order."""
    if df.empty or not cols:
        return df.reset_index(drop=True)
    return df.sort_values(cols, na_position="last", kind="mergesort").reset_index(drop=True)


def aggregate(runs: pd.DataFrame, group_cols: list[str]) -> pd.DataFrame:
    """Median/min/max of METRICS and the run count per config, over the ok runs."""
    ok = runs[runs["status"] == "ok"].reset_index(drop=True)
    for m in METRICS:
        if m not in ok.columns:
            ok[m] = np.nan
    optional = [(m, stat) for names, stat in ((OPTIONAL_MEDIAN, "median"), (OPTIONAL_MEAN, "mean"),
                                              (OPTIONAL_MAX, "max"))
                for m in names if m in ok.columns and ok[m].notna().any()]
    # Group on normalised text keys so missing knobs (NaN/None/<NA>) form one group, not a dropped row.
    keys = pd.DataFrame({c: norm_series(ok[c]) for c in group_cols})
    gid = keys.apply(tuple, axis=1) if group_cols else pd.Series([()] * len(ok))
    rows = []
    for _, idx in sorted(ok.groupby(gid, sort=False).groups.items(), key=lambda kv: kv[0]):
        g = ok.loc[idx]
        row = {c: g[c].iloc[0] for c in group_cols}
        row["count"] = len(g)
        for m in METRICS:
            v = g[m].dropna()
            row[f"{m}_median"] = float(v.median()) if len(v) else np.nan
            row[f"{m}_min"] = float(v.min()) if len(v) else np.nan
            row[f"{m}_max"] = float(v.max()) if len(v) else np.nan
        for m, stat in optional:
            v = g[m].dropna()
            row[f"{m}_{stat}"] = float(getattr(v, stat)()) if len(v) else np.nan
        row["beyond_context"] = ref.config_beyond_context(g)
        rows.append(row)
    stat_cols = (["count"] + [f"{m}_{s}" for m in METRICS for s in ("median", "min", "max")]
                 + [f"{m}_{stat}" for m, stat in optional] + ["beyond_context"])
    out = pd.DataFrame(rows, columns=group_cols + stat_cols)
    for c in group_cols:  # keep the runs' dtypes (Int64 stays Int64, not float)
        out[c] = out[c].astype(ok[c].dtype) if len(out) else out[c]
    out["count"] = out["count"].astype("int64")
    out["beyond_context"] = out["beyond_context"].astype("boolean")
    return sort_table(out, group_cols)


def default_match(baseline: dict[str, str]) -> tuple[str, ...]:
    """--match when not given: the dense run is matched on model, text and device only (not window or R)."""
    return ref.DENSE_MATCH if ref.is_dense(baseline) else DEFAULT_MATCH


def pareto_mask(x: pd.Series, y: pd.Series) -> pd.Series:
    """True where no other point has x <= and y <= with one strictly smaller (both minimised).

    Points with a missing coordinate are never optimal; identical points are both optimal.
    """
    xs, ys = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    out = np.zeros(len(xs), dtype=bool)
    for i in np.flatnonzero(ok):
        dom = ok & (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        out[i] = not dom.any()
    return pd.Series(out, index=x.index)


def summarize(runs: pd.DataFrame, group_cols: list[str], baseline: dict[str, str],
              match: list[str] | tuple[str, ...] | None = None,
              pareto_by: list[str] | tuple[str, ...] = DEFAULT_PARETO_BY,
              lazy: dict[str, str] | None = None) -> Summary:
    """The summary table: one row per config with stats, baseline comparison and Pareto flag.

    ppl_increase_pct = 100 * (ppl_median / baseline ppl_median - 1); tpot_speedup = baseline
    tpot_ms_median / tpot_ms_median. `lazy` (default policy=streaming) with compress_every > 1
    marks the plain lazy-prune configs used by the recommendations and the verdict.
    """
    t = aggregate(runs, group_cols)
    match = ref.expand(default_match(baseline) if match is None else match, group_cols)
    pareto_by = [k for k in pareto_by if k in group_cols]
    warnings: list[str] = []
    keys = pd.DataFrame({c: norm_series(t[c]) for c in group_cols}, index=t.index)
    t["is_baseline"] = matches(t, baseline)
    refs, missing = ref.match_all(t, keys, group_cols, baseline, match)
    b_ppl, b_tpot = ref.pick(t, refs, "ppl_median"), ref.pick(t, refs, "tpot_ms_median")
    spec = ",".join(f"{k}={v}" for k, v in baseline.items())
    for msg, idx in missing.items():
        warnings.append(f"baseline `{spec}`: {msg} ({len(idx)} config{'s' if len(idx) != 1 else ''}"
                        " left with NaN PPL increase and speedup)")
    t["baseline_ppl_median"] = np.array(b_ppl, dtype=float)
    t["baseline_tpot_ms_median"] = np.array(b_tpot, dtype=float)
    t["ppl_increase_pct"] = 100.0 * (t["ppl_median"] / t["baseline_ppl_median"] - 1.0)
    t["tpot_speedup"] = t["baseline_tpot_ms_median"] / t["tpot_ms_median"]
    # The plan's reference is the dense run, the seed's strict streaming: both shown wherever they exist.
    for name, rspec, rmatch in (("dense", ref.DENSE, ref.DENSE_MATCH), ("strict", ref.STRICT, DEFAULT_MATCH)):
        if baseline == rspec:  # the --baseline itself (with its --match): the same numbers
            t[f"{name}_ppl_median"] = t["baseline_ppl_median"]
            t[f"ppl_increase_vs_{name}_pct"] = t["ppl_increase_pct"]
            t[f"{name}_beyond_context"] = pd.array([t.at[j, "beyond_context"] if j is not None else pd.NA
                                                    for j in refs], dtype="boolean")
        else:
            ref.add_reference(t, keys, group_cols, name, rspec, ref.expand(rmatch, group_cols))
    lazy = lazy if lazy is not None else {"policy": "streaming"}
    ce = pd.to_numeric(t["compress_every"], errors="coerce") if "compress_every" in t else pd.Series(np.nan, index=t.index)
    t["lazy_prune"] = matches(t, lazy) & (ce > 1).fillna(False).astype(bool)
    t["pareto"] = False
    scopes = keys[pareto_by].apply(tuple, axis=1) if pareto_by else pd.Series([()] * len(t), index=t.index)
    for _, idx in t.groupby(scopes, sort=False).groups.items():
        t.loc[idx, "pareto"] = pareto_mask(t.loc[idx, "tpot_ms_median"], t.loc[idx, "ppl_increase_pct"])
    for c in ("is_baseline", "lazy_prune", "pareto"):
        t[c] = t[c].astype(bool)
    warnings += spread_warnings(t, group_cols)
    return Summary(t, group_cols, warnings, dict(baseline), match, pareto_by)


def spread_warnings(t: pd.DataFrame, group_cols: list[str], limit: float = TPOT_SPREAD_WARN) -> list[str]:
    """One warning naming the configs whose repeats disagree on TPOT by more than `limit` (max/min)."""
    ratio = t["tpot_ms_max"] / t["tpot_ms_min"]
    noisy = t[(t["count"] > 1) & (ratio > limit)]
    if noisy.empty:
        return []
    cols = [c for c in varying(t, group_cols) if c != "backend"] or group_cols
    worst = ratio[noisy.index].sort_values(ascending=False).index
    shown = "; ".join(f"{config_label(t.loc[i], cols)}: {t.at[i, 'tpot_ms_min']:.3g}-{t.at[i, 'tpot_ms_max']:.3g} ms"
                      for i in worst[:3])
    more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
    return [f"TPOT varies more than {100 * (limit - 1):.0f} % between the repeats of {len(worst)} "
            f"config{'s' if len(worst) != 1 else ''} ({shown}{more}): their median is not a stable speed; "
            "compare min or rerun them"]


def varying(t: pd.DataFrame, cols: list[str]) -> list[str]:
    """Those of `cols` that take more than one value in `t`."""
    return [c for c in cols if c in t and norm_series(t[c]).nunique() > 1]


def config_label(row: pd.Series, cols: list[str]) -> str:
    """`policy=streaming compress_every=4` from the given columns (missing values left out)."""
    return " ".join(f"{c}={norm(row[c])}" for c in cols if c in row and norm(row[c]) != NA)


def write_summary(s: Summary, out) -> None:
    s.table.to_parquet(out / "summary.parquet", index=False)
    s.table.to_csv(out / "summary.csv", index=False, float_format="%.10g", lineterminator="\n")
