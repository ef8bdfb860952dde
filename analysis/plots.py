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
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .labels import label_points  # noqa: E402
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
ZOOM_REL = 0.05      # configs within 5 % TPOT of each other form a cluster ...
ZOOM_MIN = 5         # ... of at least this many points ...
ZOOM_SPAN = 0.10     # ... spanning under 10 % of the panel's TPOT range: it gets a zoomed panel
ZOOM_TEXT_LABELS = 12  # more points in a zoomed panel: numbered, with a key table (zoom_key)


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


def dense_cluster(x: pd.Series, log: bool = False) -> pd.Series:
    """The largest group of points whose TPOT lies within ZOOM_REL of each other, if it holds at least
    ZOOM_MIN points and spans under ZOOM_SPAN of the panel's TPOT range (on the axis' scale): those
    points pile up (most fast-path configs share one TPOT) and get a zoomed panel of their own."""
    v = x.to_numpy(dtype=float)
    out = pd.Series(False, index=x.index)
    if len(v) < ZOOM_MIN:
        return out
    s = np.sort(v)
    best = (0, 0)
    for i, lo in enumerate(s):  # widest window [lo, lo * (1 + ZOOM_REL)] by count; the first on ties
        n = int(np.searchsorted(s, lo * (1 + ZOOM_REL), side="right")) - i
        if n > best[1]:
            best = (i, n)
    lo = s[best[0]]
    hi = s[best[0] + best[1] - 1]
    f = np.log if log and s[0] > 0 else (lambda z: z)
    span = f(s[-1]) - f(s[0])
    if best[1] < ZOOM_MIN or span <= 0 or (f(hi) - f(lo)) > ZOOM_SPAN * span:
        return out
    return pd.Series((v >= lo) & (v <= hi), index=x.index)


def _pareto_points(ax, g: pd.DataFrame, pal: dict, styles: list[str], gid: str, legend: bool) -> None:
    sns.scatterplot(data=g, x="tpot_ms_median", y="ppl_increase_pct", hue="policy ", style="cache/backend",
                    hue_order=list(pal), style_order=styles, palette=pal, s=60, ax=ax, zorder=3, legend=legend)
    ax.collections[-1].set_gid(gid)
    base = g[g["is_baseline"]]
    if len(base):
        ax.scatter(base["tpot_ms_median"], base["ppl_increase_pct"], s=220, facecolors="none",
                   edgecolors="black", linewidths=1.5, zorder=4, label="baseline", gid=gid.replace("configs", "baseline"))


def _frontier(ax, g: pd.DataFrame, gid: str = "frontier") -> None:
    front = g[g["pareto"]]
    if len(front):
        # Staircase from the top of the plot down through the frontier points (sorted by TPOT),
        # then flat to the slowest config: the boundary of the dominated region, visible even
        # when a single point is optimal.
        fx = [front["tpot_ms_median"].iloc[0]] + list(front["tpot_ms_median"]) + [g["tpot_ms_median"].max()]
        fy = [g["ppl_increase_pct"].max()] + list(front["ppl_increase_pct"]) + [front["ppl_increase_pct"].iloc[-1]]
        ax.step(fx, fy, where="post", color="0.4", lw=1, ls="--", zorder=2, label="Pareto frontier", gid=gid)


def _label_text(labelled: pd.DataFrame, g: pd.DataFrame, label_cols: list[str]) -> list[str]:
    # name what varies among the labelled points (the panel's variation if only one is labelled)
    among = labelled if len(labelled) > 1 else g
    cols = [c for c in label_cols if c in g and among[c].map(norm).nunique() > 1]
    return [compact_label(r, cols) for _, r in labelled.iterrows()]


def pareto_plot(t: pd.DataFrame, title: str, label_cols: list[str], facet_cols: list[str] = ("model",)) -> plt.Figure:
    """TPOT vs PPL increase, one point per config; hue = policy, style = cache/backend.

    One panel per combination of `facet_cols` (model, and device if several); the Pareto frontier is
    a dashed step line, the baseline ringed. Where many configs share one TPOT (dense_cluster), a
    zoomed panel to the right shows and labels them; the main panel marks the zoomed area. Labels never
    collide (labels.label_points). Configs without a PPL increase (no baseline) are left out: the
    report lists them.
    """
    t, panels_ = _pareto_panels(t, facet_cols)
    zoom = {f: z for f, _, z, _ in panels_}
    ncols = sum(2 if z.any() else 1 for z in zoom.values()) or 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.8), squeeze=False)
    pal = palette(t["policy "])
    styles = sorted(set(t["cache/backend"]))
    panels = iter(axes[0])
    to_label = []  # (ax, labelled rows, texts): placed once the layout is final
    for f, g, z, logx in panels_:
        ax = next(panels)
        if not g.empty:
            _pareto_points(ax, g, pal, styles, "configs", legend=True)
            _frontier(ax, g)
            # Labels name only what varies inside this panel; with many configs only the frontier and the
            # baseline are labelled (the tables list every point); zoomed points are labelled in the zoom.
            labelled = g if len(g) <= MAX_LABELS else g[g["pareto"] | g["is_baseline"].astype(bool)]
            if z.any():
                labelled = labelled[~z[labelled.index]]
            to_label.append((ax, labelled, _label_text(labelled, g, label_cols)))
            if g["ppl_increase_pct"].max() - g["ppl_increase_pct"].min() > SYMLOG_SPAN:
                ax.set_yscale("symlog", linthresh=1.0)  # a few outliers (+200 %) must not flatten the rest
            if logx:
                ax.set_xscale("log")  # eager (~30 ms) next to graph paths (~1 ms): both readable
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
        _decorate(ax, title + (f" — {f}" if f else ""))
        if len(g) and z.any():
            c = g[z]
            zx = _padded(c["tpot_ms_median"])
            zy = _padded(c["ppl_increase_pct"])
            ax.add_patch(plt.Rectangle((zx[0], zy[0]), zx[1] - zx[0], zy[1] - zy[0], fill=False, ec="0.3",
                                       lw=0.8, ls=":", zorder=5, gid="zoom_area"))
            zax = next(panels)
            _pareto_points(zax, c, pal, styles, "configs_zoom", legend=False)
            _frontier(zax, g, gid="frontier_zoom")
            zax.set_xlim(*zx)
            zax.set_ylim(*zy)
            # Few points: their labels; many: numbers, keyed in a table (zoom_key) next to the figure.
            texts = _label_text(c, c, label_cols) if len(c) <= ZOOM_TEXT_LABELS else [str(k) for k in range(1, len(c) + 1)]
            to_label.append((zax, c, texts))
            _decorate(zax, f"zoom: {len(c)} configs at {c['tpot_ms_median'].min():.3g}-"
                           f"{c['tpot_ms_median'].max():.3g} ms" + (f" — {f}" if f else ""))
    fig.tight_layout()
    for ax, lab, texts in to_label:
        label_points(ax, lab["tpot_ms_median"], lab["ppl_increase_pct"], texts)
    return fig


def _pareto_panels(t: pd.DataFrame, facet_cols) -> tuple[pd.DataFrame, list]:
    """The plotted rows and, per panel: (facet, its rows sorted by TPOT then PPL, zoom mask, log x)."""
    t = t[t["tpot_ms_median"].notna() & t["ppl_increase_pct"].notna()].copy()
    t = t.drop(columns=[c for c in ("policy ", "cache/backend") if c in t])
    # seaborn titles the legend sections by column name: "policy " (text form of policy) and "cache/backend".
    t["policy "] = norm_series(t["policy"]) if "policy" in t else "-"
    t["cache/backend"] = _style_col(t)
    fkey = _facet_key(t, list(facet_cols))
    out = []
    for f in sorted(set(fkey)) or [""]:
        g = t[fkey == f].sort_values(["tpot_ms_median", "ppl_increase_pct"], kind="mergesort")
        logx = bool(len(g) and g["tpot_ms_median"].min() > 0
                    and g["tpot_ms_median"].max() / g["tpot_ms_median"].min() > TPOT_LOG_SPAN)
        z = dense_cluster(g["tpot_ms_median"], logx) if len(g) else pd.Series(dtype=bool)
        out.append((f, g, z, logx))
    return t, out


def zoom_key(t: pd.DataFrame, label_cols: list[str], facet_cols: list[str] = ("model",)) -> pd.DataFrame:
    """What the numbers in pareto_plot's zoomed panels stand for: one row per numbered point."""
    rows = []
    for f, g, z, _ in _pareto_panels(t, facet_cols)[1]:
        c = g[z] if len(g) else g
        if len(c) <= ZOOM_TEXT_LABELS:
            continue
        cols = [k for k in list(label_cols) + ["cache/backend"] if k in c and c[k].map(norm).nunique() > 1]
        for k, (_, r) in enumerate(c.iterrows(), 1):
            rows.append({"panel": f, "#": k, "config": f"{r['policy ']} {compact_label(r, cols)}".strip(),
                         "tpot_ms_median": r["tpot_ms_median"], "ppl_increase_pct": r["ppl_increase_pct"],
                         "pareto": bool(r["pareto"])})
    return pd.DataFrame(rows, columns=["panel", "#", "config", "tpot_ms_median", "ppl_increase_pct", "pareto"])


def _padded(v: pd.Series, frac: float = 0.08) -> tuple[float, float]:
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * frac or max(abs(lo) * 0.01, 0.01)
    return lo - pad, hi + pad


def _decorate(ax, title: str) -> None:
    ax.axhline(0, color="0.8", lw=0.8, zorder=1)
    ax.set_xlabel(TPOT_LABEL)
    ax.set_ylabel(PPL_INC_LABEL)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


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
        pols = norm_series(g["policy"]) if "policy" in g else pd.Series("-", index=g.index)
        for pol, k in sorted(set(zip(pols, skey))):  # a line per policy and knob setting
            s = g[(pols == pol) & (skey == k)].sort_values("compress_every")
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


def regime_data(t: pd.DataFrame) -> pd.DataFrame:
    """The summary rows a regime map draws: evicting configs with a PPL, a window and R (R/W = x)."""
    need = ("window", "compress_every", "ppl_median", "policy")
    if len(t) == 0 or any(c not in t for c in need):
        return t.iloc[0:0]
    pol = norm_series(t["policy"])
    d = t[(pol != "full") & t["ppl_median"].notna() & t["window"].notna() & t["compress_every"].notna()].copy()
    if "dataset" in d:
        d = d[norm_series(d["dataset"]) != "passkey"]  # its PPL is over filler text: the pass-key plots cover it
    d["r_over_w"] = d["compress_every"].astype(float) / d["window"].astype(float)
    return d


def regime_plot(t: pd.DataFrame, facet_cols: list[str], series_cols: list[str]) -> plt.Figure:
    """PPL vs R/W (compress_every / window): one row of panels per `facet_cols` value (model, dataset),
    one panel per window, one line per policy (and other varying knobs in `series_cols`); the dense run's
    PPL (when there is one) as a grey dashed line."""
    d = regime_data(t)
    fkey = _facet_key(d, facet_cols)
    # only the facets that hold a regime sweep: other sweeps in the same report (one window, a few R)
    # would add empty panels and their many configs to the legend
    keep = [f for f in sorted(set(fkey)) if has_regimes(d[fkey == f])]
    if keep:
        d, fkey = d[fkey.isin(keep)], fkey[fkey.isin(keep)]
    rows = keep or sorted(set(fkey)) or [""]
    wins = sorted({float(w) for w in d["window"]}) or [0.0]
    fig, axes = plt.subplots(len(rows), len(wins), figsize=(4.6 * len(wins) + 1.5, 3.6 * len(rows)), squeeze=False)
    pal = palette(d["policy"]) if len(d) else {}
    for ri, f in enumerate(rows):
        for wi, w in enumerate(wins):
            ax = axes[ri, wi]
            g = d[(fkey == f) & (d["window"].astype(float) == w)]
            # a line per policy; knobs that vary within one policy's configs here split it further
            skey = pd.Series("", index=g.index, dtype=object)
            for pol_rows in g.groupby(norm_series(g["policy"]), sort=True).groups.values():
                gp = g.loc[pol_rows]
                cols = [c for c in series_cols if c in gp and gp[c].map(norm).nunique() > 1]
                if cols:
                    skey[pol_rows] = [" " + compact_label(r, cols) for _, r in gp.iterrows()]
            seen: dict[str, int] = {}
            pols = norm_series(g["policy"])
            for pol, k in sorted(set(zip(pols, skey))):
                sr = g[(pols == pol) & (skey == k)].sort_values("r_over_w")
                n = seen[pol] = seen.get(pol, -1) + 1
                ax.plot(sr["r_over_w"], sr["ppl_median"], marker=MARKERS[n % len(MARKERS)], ls=DASHES[n % len(DASHES)],
                        ms=5, lw=1.2, color=pal.get(pol, "C0"), label=f"{pol}{k}", gid=f"regime:{pol}{k}")
            dense = g["dense_ppl_median"].dropna() if "dense_ppl_median" in g else pd.Series(dtype=float)
            if len(dense):
                ax.axhline(float(dense.median()), color="0.5", ls="--", lw=1, label="dense (policy=full)",
                           gid="dense")
            xs = sorted(set(g["r_over_w"]))
            if xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:
                ax.set_xscale("log", base=2)
            if xs:
                ax.set_xticks(xs, [_ratio(v) for v in xs], fontsize=7)
                ax.minorticks_off()
            ax.set_xlabel("R / W (compress_every / window)")
            ax.set_ylabel("PPL (median)")
            ax.set_title(f"{f} — window {w:g}" if f else f"window {w:g}", fontsize=9)
            ax.grid(alpha=0.3)
        # one legend per row, outside on the right: the panels of a row share their policies
        handles = {}
        for ax in axes[ri]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if handles:
            axes[ri, -1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                                bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def has_regimes(t: pd.DataFrame, min_windows: int = 2, min_ratios: int = 3) -> bool:
    """A regime sweep: at least `min_windows` windows, each with `min_ratios` R/W values for some policy
    (on some model and dataset)."""
    d = regime_data(t)
    if d.empty:
        return False
    keys = [c for c in ("model", "dataset", "policy") if c in d]
    n = d.groupby(keys + ["window"])["r_over_w"].nunique()
    rich = n[n >= min_ratios].reset_index()
    return bool(len(rich)) and int(rich.groupby(keys)["window"].nunique().max()) >= min_windows


def _ratio(v: float) -> str:
    """1/16 rather than 0.0625 for the R/W ticks."""
    if v >= 1 or v <= 0:
        return f"{v:g}"
    inv = 1 / v
    return f"1/{inv:g}" if abs(inv - round(inv)) < 1e-9 else f"{v:.3g}"


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


__all__ = ["pareto_plot", "zoom_key", "dense_cluster", "regime_plot", "regime_data", "trace_plot", "visible_kv_plot", "tpot_vs_compress_plot", "save", "configs_in",
           "compact_label", "TPOT_LABEL", "PPL_INC_LABEL"]
