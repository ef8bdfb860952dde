"""Figures (seaborn/matplotlib, Agg backend). Each function returns its Figure so tests can inspect it;
`save` writes PNG and SVG reproducibly (fixed SVG hash salt, no date metadata).

Artists carry gids ("configs", "frontier", "baseline", "nll:<label>", "prunes:<label>") so callers
can find them without relying on draw order.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the analysis runs on login nodes and CI

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .select import NA, norm, norm_series  # noqa: E402

plt.rcParams["svg.hashsalt"] = "streamkv-analysis"  # stable SVG element ids
plt.rcParams["figure.max_open_warning"] = 0

TPOT_LABEL = "TPOT (ms)"
PPL_INC_LABEL = "PPL increase vs baseline (%)"
# Short names for point labels; other knobs keep their own (last) name.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", ":", "-.")
MAX_LABELS = 12  # more configs in one Pareto panel: label only the frontier and the baseline
TPOT_LOG_SPAN = 10.0  # slowest / fastest TPOT in a Pareto panel above which the x axis is logarithmic
SYMLOG_SPAN = 50.0  # PPL increase range (percentage points) above which the Pareto y axis is symlog
ABBREV = {"window": "w", "compress_every": "R", "n_sink": "s", "prefill_tokens": "pf"}


def palette(values) -> dict[str, tuple]:
    vals = sorted({norm(v) for v in values})
    return dict(zip(vals, sns.color_palette("colorblind", max(len(vals), 1))))


def compact_label(row: pd.Series, cols: list[str]) -> str:
    parts = []
    for c in cols:
        v = norm(row[c])
        if v == NA:
            continue
        name = ABBREV.get(c, c.split(".")[-1])
        parts.append(f"{name}{v}" if name in ABBREV.values() else f"{name}={v}")
    return " ".join(parts)


def _style_col(t: pd.DataFrame) -> pd.Series:
    cache = norm_series(t["cache"]) if "cache" in t else pd.Series("-", index=t.index)
    backend = norm_series(t["backend"]) if "backend" in t else pd.Series("-", index=t.index)
    return cache + "/" + backend


def _facet_key(t: pd.DataFrame, cols: list[str]) -> pd.Series:
    cols = [c for c in cols if c in t]
    key = pd.Series("", index=t.index, dtype=object)
    for i, c in enumerate(cols):
        key = key + (" / " if i else "") + norm_series(t[c])
    return key


def pareto_plot(t: pd.DataFrame, title: str, label_cols: list[str], facet_cols: list[str] = ("model",)) -> plt.Figure:
    """TPOT vs PPL increase, one point per config; hue = policy, style = cache/backend.

    One panel per combination of `facet_cols` (model, and device if several); the Pareto frontier is
    a dashed step line, the baseline ringed. Configs without a PPL increase (no baseline) are left
    out: the report lists them.
    """
    t = t[t["tpot_ms_median"].notna() & t["ppl_increase_pct"].notna()].copy()
    t = t.drop(columns=[c for c in ("policy ", "cache/backend") if c in t])
    # seaborn titles the legend sections by column name: "policy " (text form of policy) and "cache/backend".
    t["policy "] = norm_series(t["policy"]) if "policy" in t else "-"
    t["cache/backend"] = _style_col(t)
    fkey = _facet_key(t, list(facet_cols))
    facets = sorted(set(fkey)) or [""]
    fig, axes = plt.subplots(1, len(facets), figsize=(6.4 * len(facets), 4.8), squeeze=False)
    pal = palette(t["policy "])
    styles = sorted(set(t["cache/backend"]))
    for ax, f in zip(axes[0], facets):
        g = t[fkey == f].sort_values(["tpot_ms_median", "ppl_increase_pct"], kind="mergesort")
        if not g.empty:
            sns.scatterplot(data=g, x="tpot_ms_median", y="ppl_increase_pct", hue="policy ", style="cache/backend",
                            hue_order=list(pal), style_order=styles, palette=pal, s=60, ax=ax, zorder=3)
            ax.collections[-1].set_gid("configs")
            front = g[g["pareto"]]
            if len(front):
                # Staircase from the top of the plot down through the frontier points (sorted by TPOT),
                # then flat to the slowest config: the boundary of the dominated region, visible even
                # when a single point is optimal.
                fx = [front["tpot_ms_median"].iloc[0]] + list(front["tpot_ms_median"]) + [g["tpot_ms_median"].max()]
                fy = [g["ppl_increase_pct"].max()] + list(front["ppl_increase_pct"]) + [front["ppl_increase_pct"].iloc[-1]]
                ax.step(fx, fy, where="post", color="0.4", lw=1, ls="--", zorder=2, label="Pareto frontier",
                        gid="frontier")
            base = g[g["is_baseline"]]
            if len(base):
                ax.scatter(base["tpot_ms_median"], base["ppl_increase_pct"], s=220, facecolors="none",
                           edgecolors="black", linewidths=1.5, zorder=4, label="baseline", gid="baseline")
            # Labels name only what varies inside this panel; with many configs only the frontier and the
            # baseline are labelled (the tables list every point), else the labels pile up unreadably.
            labelled = g if len(g) <= MAX_LABELS else g[g["pareto"] | g["is_baseline"].astype(bool)]
            # name what varies among the labelled points (the panel's variation if only one is labelled)
            among = labelled if len(labelled) > 1 else g
            cols = [c for c in label_cols if c in g and among[c].map(norm).nunique() > 1]
            for _, r in labelled.iterrows():
                ax.annotate(compact_label(r, cols), (r["tpot_ms_median"], r["ppl_increase_pct"]),
                            xytext=(4, 4), textcoords="offset points", fontsize=7, color="0.25")
            if g["ppl_increase_pct"].max() - g["ppl_increase_pct"].min() > SYMLOG_SPAN:
                ax.set_yscale("symlog", linthresh=1.0)  # a few outliers (+200 %) must not flatten the rest
            if g["tpot_ms_median"].min() > 0 and g["tpot_ms_median"].max() / g["tpot_ms_median"].min() > TPOT_LOG_SPAN:
                ax.set_xscale("log")  # eager (~30 ms) next to graph paths (~1 ms): both readable
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
        ax.axhline(0, color="0.8", lw=0.8, zorder=1)
        ax.set_xlabel(TPOT_LABEL)
        ax.set_ylabel(PPL_INC_LABEL)
        ax.set_title(title + (f" — {f}" if f else ""), fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def trace_plot(traces: list[tuple[str, pd.DataFrame, pd.DataFrame | None]], rolling: int = 64) -> plt.Figure:
    """NLL (rolling mean over `rolling` tokens) vs token index, one panel per run, prunes as ticks.

    `traces`: (label, tokens table, events table or None) per run.
    """
    n = max(len(traces), 1)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), sharex=True, squeeze=False)
    for ax, (label, tok, ev) in zip(axes[:, 0], traces):
        tok = tok.sort_values("index")
        nll = tok["nll"].astype(float).rolling(rolling, min_periods=1).mean()
        # rasterized: a 20000-token trace (and its thousands of prune ticks) as SVG vectors is megabytes
        ax.plot(tok["index"], nll, lw=1, color="C0", gid=f"nll:{label}", rasterized=True)
        if ev is not None and len(ev):
            # Few prunes: full-height faint lines; many: short ticks along the top, else they hide the trace.
            lo, alpha = (0.0, 0.35) if len(ev) <= 60 else (0.92, 0.7)
            ax.vlines(ev["step"], lo, 1.0, transform=ax.get_xaxis_transform(), color="C3", lw=0.6,
                      alpha=alpha, gid=f"prunes:{label}", rasterized=True)
        ax.set_ylabel(f"NLL (nats, mean of {rolling})", fontsize=8)
        ax.set_title(f"{label} — {0 if ev is None else len(ev)} prunes (red)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("token index")
    fig.tight_layout()
    return fig


def visible_kv_plot(traces: list[tuple[str, pd.DataFrame, pd.DataFrame | None]]) -> plt.Figure:
    """Visible KV (cached tokens attended to) vs token index, all chosen runs on one axes."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, (label, tok, _) in enumerate(traces):
        tok = tok.sort_values("index")
        ax.plot(tok["index"], tok["visible_kv"], lw=1, color=f"C{i % 10}", label=label, gid=f"kv:{label}")
    ax.set_xlabel("token index")
    ax.set_ylabel("visible KV (tokens)")
    if traces:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def tpot_vs_compress_plot(t: pd.DataFrame, facet_cols: list[str], series_cols: list[str]) -> plt.Figure:
    """Median TPOT vs compress_every; one line per policy and other varying knobs (`series_cols`),
    colour = policy; one panel per combination of `facet_cols` (model, dataset)."""
    t = t[t["tpot_ms_median"].notna() & t["compress_every"].notna()].copy()
    fkey = _facet_key(t, facet_cols)
    facets = sorted(set(fkey)) or [""]
    fig, axes = plt.subplots(1, len(facets), figsize=(5.5 * len(facets), 4), squeeze=False)
    pal = palette(t["policy"]) if "policy" in t else {}
    for ax, f in zip(axes[0], facets):
        g = t[fkey == f]
        skey = pd.Series("", index=g.index)
        for c in series_cols:
            skey = skey + " " + g.apply(lambda r, c=c: compact_label(r, [c]), axis=1)
        seen: dict[str, int] = {}
        for k in sorted(set(skey)):
            s = g[skey == k].sort_values("compress_every")
            pol = norm(s["policy"].iloc[0]) if "policy" in s else "-"
            n = seen[pol] = seen.get(pol, -1) + 1  # same policy, other knobs: same colour, other marker/dash
            ax.plot(s["compress_every"].astype(float), s["tpot_ms_median"], marker=MARKERS[n % len(MARKERS)],
                    ls=DASHES[n % len(DASHES)], ms=5, lw=1, color=pal.get(pol, "C0"), label=f"{pol}{k}",
                    gid=f"series:{pol}{k}")
        vals = sorted(set(g["compress_every"].astype(float)))
        if vals and vals[-1] / max(vals[0], 1) >= 8:
            ax.set_xscale("log", base=2)
        if vals:
            ax.set_xticks(vals, [f"{v:g}" for v in vals])
            ax.minorticks_off()
        ax.set_xlabel("compress_every (R)")
        ax.set_ylabel(TPOT_LABEL)
        ax.set_title(f, fontsize=10)
        if len(g):
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, out_dir: Path, name: str) -> Path:
    """Write `name`.png and `name`.svg; return the PNG path. Closes the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=110, metadata={"Software": None})
    fig.savefig(out_dir / f"{name}.svg", metadata={"Date": None})
    plt.close(fig)
    return png


def configs_in(fig: plt.Figure) -> int:
    """Number of config points drawn by pareto_plot (for tests and sanity checks)."""
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_gid() == "configs")


__all__ = ["pareto_plot", "trace_plot", "visible_kv_plot", "tpot_vs_compress_plot", "save", "configs_in",
           "compact_label", "TPOT_LABEL", "PPL_INC_LABEL"]
