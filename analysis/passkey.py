"""Pass-key retrieval (dataset=passkey): does a policy still answer with a key it has evicted?

A pass-key run hides a key at `dataset.depth` of a `dataset.length`-token filler text and asks for it at
the end; its record has `answer_acc` (0/1), `answer_nll` and `key_distance` (tokens from the key to the
answer). A policy config is everything but the text (dataset.*), so its runs pool lengths, depths and
seeds. A key is older than the window when key_distance > n_sink + window: plain StreamingLLM has
evicted it by then, so only a policy that keeps or brings back old tokens can answer.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .select import NA, norm, norm_series
from .summarize import pareto_mask

PASSKEY = "passkey"
LENGTH_COLS = ("dataset.length", "dataset.max_tokens")  # the text length, newest record field first
DEPTH_COL = "dataset.depth"
ABBREV = {"window": "w", "compress_every": "R", "n_sink": "s", "prefill_tokens": "pf"}
DEFAULT_ACC_MIN = 0.5  # a config "retrieves" old keys when it answers at least this share of them
HIDE = ("model", "device_name", "policy", "dataset")  # named by the scope/title or always first


def passkey_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The ok pass-key runs that report an answer."""
    if "dataset" not in runs or "answer_acc" not in runs:
        return runs.iloc[0:0]
    m = (runs["status"] == "ok") & (norm_series(runs["dataset"]) == PASSKEY) & runs["answer_acc"].notna()
    return runs[m].reset_index(drop=True)


def method_columns(group_cols: list[str]) -> list[str]:
    """A pass-key config: the grouping columns minus the text (dataset, dataset.*)."""
    return [c for c in group_cols if c != "dataset" and not c.startswith("dataset.")]


def short_label(row: pd.Series, cols: list[str]) -> str:
    """`refresh w256 R64 refresh_budget=16`: the policy bare, then the other columns in `cols`."""
    parts = [norm(row["policy"])] if "policy" in row else []
    for c in cols:
        if c in HIDE or norm(row[c]) == NA:
            continue
        name = ABBREV.get(c, c.split(".")[-1])
        parts.append(f"{name}{norm(row[c])}" if c in ABBREV else f"{name}={norm(row[c])}")
    return " ".join(parts)


def labelled(pk: pd.DataFrame, group_cols: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """pk with a `config` label column (the method columns that vary); and the method columns."""
    mcols = [c for c in method_columns(group_cols) if c in pk]
    vary = [c for c in mcols if norm_series(pk[c]).nunique() > 1]
    pk = pk.copy()
    full = [short_label(r, vary) for _, r in pk.iterrows()]
    # A knob at the value most policies share (refresh_budget=0 on every non-refresh policy) only lengthens
    # the labels: left out where the labels stay one per config. Window, R and sinks always show.
    configs = pk.assign(_full=full).drop_duplicates("_full")
    common = {c: _common(configs, c) for c in vary if c not in ABBREV and len(configs)}
    short = [short_label(r, [c for c in vary if not (c in common and norm(r[c]) == common[c])])
             for _, r in pk.iterrows()]
    one_to_one = len(set(zip(full, short))) == len(set(short)) == len(set(full))
    pk["config"] = short if one_to_one else full
    return pk, mcols


def _common(configs: pd.DataFrame, c: str) -> str:
    """The value of `c` most policies share: each policy votes once, with its own most frequent value, so
    a policy swept over many configs (refresh's selections) does not outvote the others."""
    vals = norm_series(configs[c])
    if "policy" not in configs:
        return vals.mode().iloc[0]
    votes = vals.groupby(norm_series(configs["policy"]).to_numpy()).agg(lambda v: v.mode().iloc[0])
    return votes.mode().iloc[0]


def length_column(pk: pd.DataFrame) -> str | None:
    return next((c for c in LENGTH_COLS if c in pk and pk[c].notna().any()), None)


def reach(pk: pd.DataFrame) -> pd.Series:
    """n_sink + window: the oldest key distance a strict window still holds; NaN for the dense policy."""
    if "window" not in pk:
        return pd.Series(np.nan, index=pk.index)
    sinks = pd.to_numeric(pk["n_sink"], errors="coerce").fillna(0) if "n_sink" in pk else 0
    r = pd.to_numeric(pk["window"], errors="coerce") + sinks
    if "policy" in pk:
        r[norm_series(pk["policy"]) == "full"] = np.nan  # keeps everything: no window to outlive
    return r.astype(float)


def _mean(v: pd.Series) -> float:
    v = v.dropna()
    return float(v.mean()) if len(v) else math.nan


def by_config(pk: pd.DataFrame, mcols: list[str], acc_min: float = DEFAULT_ACC_MIN) -> pd.DataFrame:
    """One row per pass-key config: runs, mean accuracy (all, beyond and within the window), median TPOT,
    the matching streaming config's TPOT, and the accuracy/TPOT Pareto flag (per model and device)."""
    cols = ["config"] + mcols + ["count", "answer_acc_mean", "answer_nll_mean", "tpot_ms_median", "reach",
                                 "n_beyond", "acc_beyond", "n_within", "acc_within", "beyond_context"]
    if pk.empty:
        return pd.DataFrame(columns=cols + ["streaming_ref", "streaming_tpot_ms", "tpot_vs_streaming",
                                            "retrieves_beyond", "pareto"])
    pk = pk.assign(_reach=reach(pk), _kd=pd.to_numeric(pk.get("key_distance"), errors="coerce"))
    rows = []
    for label, g in pk.groupby("config", sort=True):
        beyond = g[g["_kd"] > g["_reach"]]
        within = g[g["_kd"] <= g["_reach"]]
        bc = g["beyond_context"].dropna() if "beyond_context" in g else pd.Series(dtype=bool)
        rows.append({"config": label, **{c: g[c].iloc[0] for c in mcols}, "count": len(g),
                     "answer_acc_mean": _mean(g["answer_acc"]),
                     "answer_nll_mean": _mean(g["answer_nll"]) if "answer_nll" in g else math.nan,
                     "tpot_ms_median": float(g["tpot_ms"].median()) if "tpot_ms" in g and g["tpot_ms"].notna().any() else math.nan,
                     "reach": g["_reach"].iloc[0], "n_beyond": len(beyond), "acc_beyond": _mean(beyond["answer_acc"]),
                     "n_within": len(within), "acc_within": _mean(within["answer_acc"]),
                     "beyond_context": bool(bc.astype(bool).any()) if len(bc) else pd.NA})
    t = pd.DataFrame(rows, columns=cols)
    t["beyond_context"] = t["beyond_context"].astype("boolean")
    _streaming_reference(t, mcols)
    t["retrieves_beyond"] = (t["n_beyond"] > 0) & (t["acc_beyond"] >= acc_min)
    scope = [c for c in ("model", "device_name") if c in t]
    t["pareto"] = False
    key = t[scope].apply(lambda r: tuple(norm(v) for v in r), axis=1) if scope else pd.Series([()] * len(t))
    for _, idx in t.groupby(key, sort=False).groups.items():
        t.loc[idx, "pareto"] = pareto_mask(t.loc[idx, "tpot_ms_median"], -t.loc[idx, "answer_acc_mean"])
    t["pareto"] = t["pareto"].astype(bool)
    return t


# A config's streaming reference shares these (where present): same model, hardware, decode path and window.
SAME_AS_STREAMING = ("model", "device_name", "n_sink", "window", "cache", "backend", "backend_used")


def _streaming_reference(t: pd.DataFrame, mcols: list[str]) -> None:
    """streaming_ref / streaming_tpot_ms / tpot_vs_streaming: the policy=streaming config on the same
    model, device, decode path, sinks and window; the one with the same compress_every if it ran, else
    the smallest compress_every. A config whose window no streaming run shares (a refresh region carved
    out of the window at a fixed KV budget) gets the streaming window closest to its window + refresh
    region."""
    keys = [c for c in SAME_AS_STREAMING if c in mcols]
    pol = norm_series(t["policy"]) if "policy" in t else pd.Series(NA, index=t.index)
    window = pd.to_numeric(t["window"], errors="coerce") if "window" in t else pd.Series(np.nan, index=t.index)
    has_region = "policy.refresh_budget" in t
    region = pd.to_numeric(t["policy.refresh_budget"], errors="coerce").fillna(0) if has_region else 0
    slots = window + region  # the slots besides the sinks
    ref, ref_tpot = [], []
    for i in t.index:
        if pol[i] in ("streaming", "full"):
            ref.append("")
            ref_tpot.append(math.nan)
            continue
        cand = t[(pol == "streaming")]
        for k in keys:
            if k != "window":
                cand = cand[norm_series(cand[k]) == norm(t.at[i, k])]
        if "window" in keys and not cand.empty:
            same = cand[norm_series(cand["window"]) == norm(t.at[i, "window"])]
            if same.empty:  # the closest window to window + refresh region (ties: the smaller)
                gap = (window[cand.index] - slots[i]).abs()
                near = window[cand.index][gap == gap.min()]
                same = cand.loc[near.index[near == near.min()]]
            cand = same
        if cand.empty:
            ref.append("")
            ref_tpot.append(math.nan)
            continue
        ce = pd.to_numeric(cand["compress_every"], errors="coerce") if "compress_every" in cand else None
        own = pd.to_numeric(pd.Series([t.at[i, "compress_every"]]), errors="coerce").iloc[0] if ce is not None else None
        if ce is not None and (ce == own).any():
            r = cand[ce == own].iloc[0]
        elif ce is not None:
            r = cand.loc[ce.sort_values(kind="mergesort").index].iloc[0]
        else:
            r = cand.iloc[0]
        ref.append(r["config"])
        ref_tpot.append(r["tpot_ms_median"])
    t["streaming_ref"] = ref
    t["streaming_tpot_ms"] = np.array(ref_tpot, dtype=float)
    t["tpot_vs_streaming"] = t["tpot_ms_median"] / t["streaming_tpot_ms"]


def grid(g: pd.DataFrame, length_col: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean answer_acc, run count) with one row per depth and one column per text length."""
    depth = g[DEPTH_COL] if DEPTH_COL in g else pd.Series(np.nan, index=g.index)
    d = pd.DataFrame({"depth": pd.to_numeric(depth, errors="coerce"),
                      "length": pd.to_numeric(g[length_col], errors="coerce"), "acc": g["answer_acc"].astype(float)})
    mean = d.pivot_table(index="depth", columns="length", values="acc", aggfunc="mean", dropna=False)
    count = d.pivot_table(index="depth", columns="length", values="acc", aggfunc="count", dropna=False)
    return mean.sort_index().sort_index(axis=1), count.sort_index().sort_index(axis=1)


def distance_bins(kd: pd.Series, max_exact: int = 10) -> pd.DataFrame:
    """Bin edges per run: each distinct key distance its own bin when there are few, else powers of two
    ([2^k, 2^(k+1)), distances below 1 in [0, 1)); `x` is the bin's plotting position."""
    kd = pd.to_numeric(kd, errors="coerce")
    if kd.dropna().nunique() <= max_exact:
        return pd.DataFrame({"bin_lo": kd, "bin_hi": kd, "x": kd}, index=kd.index)
    lo = np.where(kd >= 1, 2.0 ** np.floor(np.log2(kd.clip(lower=1))), 0.0)
    hi = np.where(kd >= 1, lo * 2, 1.0)
    lo = pd.Series(lo, index=kd.index).where(kd.notna())
    hi = pd.Series(hi, index=kd.index).where(kd.notna())
    return pd.DataFrame({"bin_lo": lo, "bin_hi": hi, "x": np.sqrt(lo.clip(lower=0.5) * hi)}, index=kd.index)


def by_distance(pk: pd.DataFrame) -> pd.DataFrame:
    """Mean answer accuracy and run count per config and key-distance bin (bins shared by all configs)."""
    cols = ["config", "bin_lo", "bin_hi", "x", "count", "answer_acc_mean"]
    if pk.empty or "key_distance" not in pk:
        return pd.DataFrame(columns=cols)
    b = distance_bins(pk["key_distance"])
    d = pd.concat([pk[["config", "answer_acc"]], b], axis=1).dropna(subset=["bin_lo"])
    out = (d.groupby(["config", "bin_lo", "bin_hi", "x"], sort=True)["answer_acc"]
           .agg(["count", "mean"]).reset_index().rename(columns={"mean": "answer_acc_mean"}))
    return out[cols]


def _f(v: float, nd: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def findings(t: pd.DataFrame, acc_min: float = DEFAULT_ACC_MIN) -> list[str]:
    """Sentences from the by_config table: who answers with a key older than its window, at what TPOT
    relative to streaming; who does not; where no run tested it; the dense reference."""
    out = []
    evicting = t[t["reach"].notna()] if len(t) else t
    tested = evicting[evicting["n_beyond"] > 0]
    yes = tested[tested["retrieves_beyond"]].sort_values(["tpot_ms_median", "config"], kind="mergesort")
    no = tested[~tested["retrieves_beyond"]].sort_values(["acc_beyond", "config"], ascending=[False, True],
                                                         kind="mergesort")
    rule = (f"a key older than the window (key_distance > n_sink + window), answered in at least "
            f"{100 * acc_min:g} % of those runs")

    def cost(r) -> str:
        if not np.isfinite(r.tpot_vs_streaming):
            return f"TPOT {_f(r.tpot_ms_median)} ms, no matching streaming config"
        return (f"TPOT {_f(r.tpot_ms_median)} ms = {r.tpot_vs_streaming:.2f}x streaming "
                f"({r.streaming_ref}: {_f(r.streaming_tpot_ms)} ms)")

    if len(yes):
        out.append(f"Retrieve {rule}: " + "; ".join(
            f"**{r.config}** (accuracy {_f(r.acc_beyond)} over {r.n_beyond} runs; {cost(r)})"
            for r in yes.itertuples()) + ".")
    elif len(tested):
        out.append(f"No config retrieves {rule}.")
    if len(no):
        out.append("Do not: " + "; ".join(f"{r.config} (accuracy {_f(r.acc_beyond)} over {r.n_beyond} runs)"
                                          for r in no.itertuples()) + ".")
    untested = evicting[evicting["n_beyond"] == 0]
    if len(untested):
        out.append("No run puts the key beyond the window of: " + ", ".join(untested["config"]) + ".")
    dense = t[t["reach"].isna()] if len(t) else t
    for r in dense.itertuples():
        bc = " (some runs beyond the model's context)" if pd.notna(r.beyond_context) and bool(r.beyond_context) else ""
        out.append(f"Dense reference {r.config}: accuracy {_f(r.answer_acc_mean)} over {r.count} runs, "
                   f"TPOT {_f(r.tpot_ms_median)} ms{bc}.")
    return out
