"""The report's pass-key section: tables (passkey_summary.*, passkey_by_distance.csv), the three
figures and the sentences of passkey.findings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import passkey as pkm
from . import passkey_plots as pkp
from .plots import save
from .report import CONTEXT_NOTE, DAGGER, devices_caption, display

SHOW = ("config", "count", "answer_acc_mean", "answer_nll_mean", "tpot_ms_median", "reach", "n_beyond", "acc_beyond",
        "n_within", "acc_within", "streaming_ref", "tpot_vs_streaming", "retrieves_beyond", "pareto")


def section(runs: pd.DataFrame, group_cols: list[str], out: Path, acc_min: float = pkm.DEFAULT_ACC_MIN):
    """-> (PNG paths, their captions, report blocks, warnings); nothing when no pass-key run is ok."""
    pk = pkm.passkey_runs(runs)
    if pk.empty:
        return [], [], [], []
    pk, mcols = pkm.labelled(pk, group_cols)
    t = pkm.by_config(pk, mcols, acc_min)
    bins = pkm.by_distance(pk)
    t.to_parquet(out / "passkey_summary.parquet", index=False)
    t.to_csv(out / "passkey_summary.csv", index=False, float_format="%.10g", lineterminator="\n")
    bins.to_csv(out / "passkey_by_distance.csv", index=False, float_format="%.10g", lineterminator="\n")
    pdir = out / "plots"
    pngs, caps, warn = [], [], []
    length_col = pkm.length_column(pk)
    if length_col is not None:
        pngs.append(save(pkp.heatmap_plot(pk, length_col, list(t["config"])), pdir, "passkey_heatmap"))
        caps.append(f"Pass-key accuracy by text length (`{length_col}`) and key depth, mean over seeds, one panel "
                    "per config")
    else:
        warn.append("pass-key runs without dataset.length or dataset.max_tokens: no heatmap")
    if len(bins):
        pngs.append(save(pkp.accuracy_vs_distance_plot(bins, t), pdir, "passkey_accuracy_vs_distance"))
        caps.append("Pass-key accuracy vs key distance (binned; counts in the table below and in "
                    "passkey_by_distance.csv)")
    else:
        warn.append("pass-key runs without key_distance: no accuracy-vs-distance plot")
    pngs.append(save(pkp.passkey_pareto_plot(t), pdir, "passkey_pareto"))
    caps.append("Pass-key: median TPOT vs mean answer accuracy per config")
    view = display(t[[c for c in SHOW if c in t]].reset_index(drop=True))
    flag = t["beyond_context"].fillna(False).astype(bool).to_numpy()
    view.loc[flag, "config"] = view.loc[flag, "config"] + " " + DAGGER
    note = f"\n\n{CONTEXT_NOTE}" if flag.any() else ""
    blocks: list = [("h", 2, "Pass-key retrieval"),
                    ("p", f"{len(pk)} pass-key runs, {len(t)} configs (each pools its text lengths, key depths and "
                          "seeds; `count` = runs). `reach` = n_sink + window; `acc_beyond` / `acc_within`: mean "
                          "accuracy over the runs whose key is older than that (`n_beyond` runs) / not; "
                          "`tpot_vs_streaming`: TPOT relative to `streaming_ref`, the streaming config with the "
                          "same window, sinks and decode path (same R if it ran; else the window closest to window + refresh "
                          "region).")]
    blocks += [("ul", pkm.findings(t, acc_min))]
    blocks += [("table", view, devices_caption(pk) + note)]
    for png, cap in zip(pngs, caps):
        blocks += [("p", f"**{cap}**"), ("img", str(png.relative_to(out)), cap)]
    if len(bins):
        bv = display(bins[["config", "bin_lo", "bin_hi", "count", "answer_acc_mean"]].reset_index(drop=True))
        blocks += [("p", "Accuracy per key-distance bin ([bin_lo, bin_hi) tokens; a single value when few "
                         "distances occur)"), ("table", bv, "")]
    return pngs, caps, blocks, warn
