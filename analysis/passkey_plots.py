"""Pass-key figures: the needle-in-a-haystack heatmap (length x depth) per config, accuracy vs key
distance, and TPOT vs accuracy. Each returns its Figure; artists carry gids for the tests
("heat:<config>", "acc:<config>", "reach:<config>", "configs", "frontier")."""

from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .labels import label_points
from .passkey import grid
from .plots import TPOT_LABEL, palette
from .select import norm

LENGTH_LABEL = "text length (tokens)"
DEPTH_LABEL = "key depth (fraction of the text)"
DIST_LABEL = "key distance (tokens from the key to the answer)"
ACC_LABEL = "answer accuracy (mean over runs)"
MAX_ANNOTATED_CELLS = 120  # per panel: more cells, no numbers in them
PANEL_COLS = 4
TITLE_CHARS = 52  # a panel title wraps at this many characters (3.6 in at 8 pt)


def _config_colors(t: pd.DataFrame) -> dict[str, tuple]:
    """One colour per policy; configs of the same policy share it (told apart by marker/dash)."""
    pal = palette(t["policy"]) if "policy" in t else {}
    return {r["config"]: pal.get(norm(r["policy"]), "C0") if "policy" in t else "C0" for _, r in t.iterrows()}


def heatmap_plot(pk: pd.DataFrame, length_col: str, configs: list[str]) -> plt.Figure:
    """One panel per config: mean answer_acc over seeds, depth (rows) x text length (columns); the cell
    text is the mean (and n when the runs per cell differ). Empty cells are grey."""
    n = max(len(configs), 1)
    ncols = min(PANEL_COLS, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.0, 3.1 * nrows), squeeze=False)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="0.85")  # grey: no run at that length and depth
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(configs):
            ax.set_axis_off()
            continue
        cfg = configs[k]
        g = pk[pk["config"] == cfg]
        mean, count = grid(g, length_col)
        count = count.fillna(0)  # a cell without runs (a sweep stopped early) counts 0, not NaN
        im = ax.imshow(mean.to_numpy(dtype=float), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                       interpolation="nearest")
        im.set_gid(f"heat:{cfg}")
        ax.set_xticks(range(mean.shape[1]), [f"{v:g}" for v in mean.columns], rotation=45, fontsize=7)
        ax.set_yticks(range(mean.shape[0]), [f"{v:g}" for v in mean.index], fontsize=7)
        if mean.size <= MAX_ANNOTATED_CELLS:
            same_n = count.to_numpy()[count.to_numpy() > 0]
            show_n = len(set(same_n.tolist())) > 1
            for (i, j), v in np.ndenumerate(mean.to_numpy(dtype=float)):
                if np.isfinite(v):
                    txt = f"{v:.2f}" + (f"\nn={int(count.iat[i, j])}" if show_n else "")
                    ax.text(j, i, txt, ha="center", va="center", fontsize=6, color="black")
        seeds = int(count.to_numpy().max()) if count.size else 0
        ax.set_title(textwrap.fill(f"{cfg} ({len(g)} runs, <= {seeds}/cell)", TITLE_CHARS), fontsize=8)
        ax.set_xlabel(LENGTH_LABEL, fontsize=8)
        ax.set_ylabel(DEPTH_LABEL, fontsize=8)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="answer accuracy")
    return fig


def accuracy_vs_distance_plot(bins: pd.DataFrame, t: pd.DataFrame) -> plt.Figure:
    """Mean answer accuracy per key-distance bin, one line per config (colour = policy); each config's
    n_sink + window as a dotted vertical line of its colour: keys right of it are older than the window."""
    n_cfg = len(set(bins["config"]))
    # the legend goes under the axes (long config labels beside them would squeeze the plot)
    fig, ax = plt.subplots(figsize=(8.5, 4.2 + 0.17 * math.ceil(n_cfg / 2)))
    colors = _config_colors(t)
    seen: dict[tuple, int] = {}
    for cfg in sorted(set(bins["config"])):
        b = bins[bins["config"] == cfg].sort_values("x")
        col = colors.get(cfg, "C0")
        n = seen[col] = seen.get(col, -1) + 1
        ax.plot(b["x"], b["answer_acc_mean"], marker="osD^vPX"[n % 7], ls=("-", "--", ":", "-.")[n % 4], lw=1.2,
                ms=5, color=col, label=f"{cfg} (n={int(b['count'].sum())})", gid=f"acc:{cfg}")
        r = t.loc[t["config"] == cfg, "reach"]
        if len(r) and np.isfinite(r.iloc[0]):
            ax.axvline(r.iloc[0], color=col, ls=":", lw=0.9, alpha=0.8, gid=f"reach:{cfg}")
    xs = bins["x"].astype(float)
    if len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 8:
        ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(DIST_LABEL)
    ax.set_ylabel(ACC_LABEL)
    ax.set_title("Pass-key accuracy vs key distance (dotted: n_sink + window of each config)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(bins):
        kw = dict(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
        leg = ax.legend(ncol=2, **kw)
        if leg.get_window_extent(fig.canvas.get_renderer()).width > fig.bbox.width:
            # two columns of these labels are wider than the figure (it would cut them): one column, taller
            leg.remove()
            ax.legend(ncol=1, **kw)
            fig.set_size_inches(8.5, 4.2 + 0.17 * n_cfg)
    fig.tight_layout()
    return fig


def passkey_pareto_plot(t: pd.DataFrame) -> plt.Figure:
    """Median TPOT vs mean answer accuracy, one point per config (colour = policy); the frontier
    (faster and more accurate) dashed; labels de-overlapped."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    g = t[t["tpot_ms_median"].notna() & t["answer_acc_mean"].notna()].sort_values(
        ["tpot_ms_median", "answer_acc_mean"], ascending=[True, False], kind="mergesort")
    colors = _config_colors(g)
    if len(g):
        ax.scatter(g["tpot_ms_median"], g["answer_acc_mean"], c=[colors[c] for c in g["config"]], s=50, zorder=3,
                   gid="configs", edgecolors="white", linewidths=0.5)
        front = g[g["pareto"]]
        if len(front):
            # Staircase: best accuracy reachable at each TPOT, from the fastest frontier point on.
            fx = list(front["tpot_ms_median"]) + [g["tpot_ms_median"].max()]
            fy = list(front["answer_acc_mean"]) + [front["answer_acc_mean"].iloc[-1]]
            ax.step(fx, fy, where="post", color="0.4", lw=1, ls="--", zorder=2, gid="frontier")
        if g["tpot_ms_median"].min() > 0 and g["tpot_ms_median"].max() / g["tpot_ms_median"].min() > 10:
            ax.set_xscale("log")
        pol = sorted({norm(p) for p in g["policy"]}) if "policy" in g else []
        pal = palette(g["policy"]) if "policy" in g else {}
        for p in pol:
            ax.scatter([], [], color=pal[p], label=p)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="policy", title_fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(TPOT_LABEL)
    ax.set_ylabel("answer accuracy (mean over lengths, depths, seeds)")
    ax.set_title("Pass-key: TPOT vs accuracy (dashed: Pareto frontier)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if len(g):
        label_points(ax, g["tpot_ms_median"], g["answer_acc_mean"], list(g["config"]))
    return fig
