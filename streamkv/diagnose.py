"""Phase-A diagnostics of one run: NLL spikes at prune boundaries vs drift of the effective window.

    python -m streamkv.diagnose RUN_DIR [--ref REF_RUN_DIR] [--out DIR] [--k 32] [--smooth 64]

Reads the run record only (result.json, tokens.parquet, events.parquet; docs/run-record.md), never
the model. Writes into --out (default RUN_DIR/diagnose):
  nll.png / nll.svg   NLL (rolling mean) vs token index with a line at every prune, the reference
                      curve, the visible-KV trace underneath, and mean excess NLL vs tokens since
                      the last prune
  spikes.csv          one row per prune: step, rows, peak, width, area, baseline
  by_age.csv          mean excess NLL by tokens since the last prune
  by_visible.csv      mean excess NLL by visible KV length
and prints the tables (rich). Excess = NLL minus the reference run's NLL of the same token (--ref,
e.g. strict streaming R=1 with the same n_sink + window on the same text), else minus the mean NLL
of the preceding 256 tokens. A spike shows as excess concentrated at small ages; a drifting
effective window as excess that follows the visible length across the whole cycle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from streamkv import spikes as SP
from streamkv.policies.base import knob_defaults
from streamkv.record import read_result

EARLY = 4  # "right after a prune" = the first EARLY tokens since the last prune


class DiagnoseError(Exception):
    """A user-facing problem (missing record, different texts); one line."""


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    tok, ev = run_dir / "tokens.parquet", run_dir / "events.parquet"
    if not tok.is_file():
        raise DiagnoseError(f"{run_dir}: no tokens.parquet (not a finished run directory)")
    result = read_result(run_dir) or {}
    events = pd.read_parquet(ev) if ev.is_file() else pd.DataFrame(columns=["step", "dropped"])
    return {"dir": run_dir, "tokens": pd.read_parquet(tok), "events": events, "result": result}


def label(run: dict) -> str:
    cfg = (run["result"] or {}).get("config") or {}
    pol = cfg.get("policy") or {}
    if not pol:
        return run["dir"].name
    defaults = knob_defaults()  # knobs away from their neutral default are shown
    knobs = " ".join(f"{k}={v}" for k, v in pol.items() if k != "name" and v != defaults.get(k, v))
    return (f"{pol.get('name')}{' ' + knobs if knobs else ''} S={cfg.get('n_sink')} W={cfg.get('window')} "
            f"R={cfg.get('compress_every')}")


def align_reference(run: dict, ref: dict) -> np.ndarray:
    """The reference run's NLL per row of `run` (same text: index and token_id must match)."""
    t = run["tokens"]
    try:
        return SP.reference_nll(ref["dir"], t["index"].to_numpy(), t["token_id"].to_numpy())
    except ValueError as exc:
        raise DiagnoseError(f"--ref: {exc}") from None


def analyse(run: dict, ref: dict | None = None, k: int = SP.SPIKE_K, threshold: float = SP.SPIKE_THRESHOLD) -> dict:
    t = run["tokens"]
    nll, index = t["nll"].to_numpy(np.float64), t["index"].to_numpy(np.int64)
    steps = SP.prune_steps(run["events"])
    reference = align_reference(run, ref) if ref is not None else None
    table = pd.DataFrame(SP.spike_table(nll, index, steps, k=k, reference=reference, threshold=threshold))
    metrics = SP.spike_metrics(nll, index, run["events"], k=k, reference=reference, threshold=threshold)
    ages = SP.token_ages(index, steps)
    by_age = pd.DataFrame(SP.excess_by(nll, index, steps, ages, reference=reference)).rename(columns={"key": "age"})
    vis = t["visible_kv"].to_numpy(np.int64)
    by_vis = pd.DataFrame(SP.excess_by(nll, index, steps, vis, reference=reference)).rename(
        columns={"key": "visible_kv"})
    return {"nll": nll, "index": index, "steps": steps, "reference": reference, "table": table,
            "metrics": metrics, "by_age": by_age, "by_visible": by_vis, "ages": ages, "k": k,
            "threshold": threshold}


def verdict(a: dict) -> list[str]:
    """Plain-language reading of the by-age and by-visible tables."""
    by_age, by_vis = a["by_age"], a["by_visible"]
    lines = []
    if not len(by_age):
        return ["no prune in this run: nothing to separate"]
    w = by_age["n"].to_numpy(float)
    ex = by_age["excess_mean"].to_numpy(float)
    early = by_age["age"].to_numpy() <= EARLY
    if early.all() or (~early).all():
        top = int(by_age["age"].max())
        lines.append(f"prunes every <= {EARLY} tokens: no room for a spike to decay (ages 1..{top})")
    else:
        e, l_ = np.average(ex[early], weights=w[early]), np.average(ex[~early], weights=w[~early])
        lines.append(f"boundary spike: mean excess {e:+.4f} nats over the first {EARLY} tokens after a prune, "
                     f"{l_:+.4f} afterwards (difference {e - l_:+.4f})")
    if len(by_vis) >= 2:
        x, y, n = (by_vis[c].to_numpy(float) for c in ("visible_kv", "excess_mean", "n"))
        slope = np.polyfit(x, y, 1, w=np.sqrt(n))[0] if np.ptp(x) > 0 else 0.0
        lines.append(f"window drift: excess changes by {slope * 100:+.4f} nats per 100 tokens of visible KV "
                     f"(visible {int(x.min())}..{int(x.max())})")
    return lines


def plot(run: dict, a: dict, ref: dict | None, out: Path, smooth: int) -> list[Path]:
    import matplotlib  # only when plotting (--out), with a non-interactive backend chosen first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = run["tokens"]
    fig = plt.figure(figsize=(12, 8.5), constrained_layout=True)
    gs = fig.add_gridspec(3, 1, height_ratios=[3, 1.3, 1.6])
    ax = fig.add_subplot(gs[0])
    axv = fig.add_subplot(gs[1], sharex=ax)
    axa = fig.add_subplot(gs[2])
    roll = pd.Series(a["nll"]).rolling(smooth, min_periods=1).mean()
    ax.plot(a["index"], roll, lw=1.0, color="C0", label=f"run: {label(run)}")
    if a["reference"] is not None:
        rroll = pd.Series(a["reference"]).rolling(smooth, min_periods=1).mean()
        ax.plot(a["index"], rroll, lw=1.0, color="C1", label=f"reference: {label(ref)}")
    # a prune after step s: the first token predicted with the pruned cache is s + 2
    xs = a["steps"] + 1.5
    alpha = 0.35 if len(xs) <= 200 else 0.08
    for axis in (ax, axv):
        if len(xs):
            axis.vlines(xs, 0, 1, transform=axis.get_xaxis_transform(), colors="0.4", lw=0.5, alpha=alpha,
                        label="prune" if axis is ax else None)
    ax.set_ylabel(f"NLL (nats, rolling mean {smooth})")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{run['dir']}  —  {len(xs)} prunes")
    axv.plot(t["index"], t["visible_kv"], lw=0.8, color="C0", drawstyle="steps-post")
    if ref is not None:
        axv.plot(ref["tokens"]["index"], ref["tokens"]["visible_kv"], lw=0.8, color="C1", drawstyle="steps-post")
    axv.set_ylabel("visible KV")
    axv.set_xlabel("token index")
    by_age = a["by_age"]
    if len(by_age):
        axa.bar(by_age["age"], by_age["excess_mean"], width=0.9, color="C2")
    axa.axhline(0, color="0.3", lw=0.6)
    axa.set_xlabel("tokens since the last prune")
    axa.set_ylabel("mean excess NLL")
    against = "the reference run" if a["reference"] is not None else "the preceding 256-token mean"
    axa.set_title("excess vs " + against,
                  fontsize=9)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "nll.png", out / "nll.svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def _bins(df: pd.DataFrame, key: str, max_rows: int = 16) -> pd.DataFrame:
    """Group a by-key table into at most max_rows ranges (weighted means) for printing."""
    if len(df) <= max_rows:
        return df.assign(range=df[key].astype(str))
    edges = np.unique(np.quantile(df[key], np.linspace(0, 1, max_rows + 1)).round().astype(int))
    cut = pd.cut(df[key], edges, include_lowest=True)
    g = df.assign(w=df["excess_mean"] * df["n"]).groupby(cut, observed=True)
    res = pd.DataFrame({"n": g["n"].sum(), "excess_mean": g["w"].sum() / g["n"].sum()})
    lo_hi = [(int(np.floor(iv.left)) + 1, int(iv.right)) for iv in res.index]  # integer keys in (left, right]
    res["range"] = [f"{lo}..{hi}" if hi > lo else str(hi) for lo, hi in lo_hi]
    return res.reset_index(drop=True)


def print_report(run: dict, a: dict, paths: list[Path], top: int = 10) -> None:
    con = Console()
    m = a["metrics"]
    s = Table(title=f"spikes after prunes — {label(run)}", title_justify="left", show_header=False)
    s.add_column(style="bold")
    s.add_column()
    s.add_row("reference", "reference run (same token)" if a["reference"] is not None
              else "mean NLL of the 256 tokens before each prune")
    s.add_row("prunes measured", f"{m['spike_n']} (k = {a['k']} tokens after each)")
    s.add_row("peak (nats)", f"mean {m['spike_peak_mean']:+.4f}   max {m['spike_peak_max']:+.4f}")
    s.add_row("width (tokens)", f"mean {m['spike_width_mean']:.2f}   max {m['spike_width_max']:.0f}   "
                                f"(excess > {a['threshold']:g} nats)")
    s.add_row("area (nats)", f"mean {m['spike_area_mean']:+.4f}   max {m['spike_area_max']:+.4f}")
    for line in verdict(a):
        s.add_row("reading", line)
    con.print(s)
    for title, df, key in (("excess NLL by tokens since the last prune", a["by_age"], "age"),
                           ("excess NLL by visible KV length", a["by_visible"], "visible_kv")):
        if not len(df):
            continue
        tb = Table(title=title, title_justify="left", min_width=len(title) + 4)
        tb.add_column(key, justify="right")
        tb.add_column("tokens", justify="right")
        tb.add_column("mean excess", justify="right")
        for _, r in _bins(df, key).iterrows():
            tb.add_row(str(r["range"]), str(int(r["n"])), f"{r['excess_mean']:+.4f}")
        con.print(tb)
    tab = a["table"]
    if len(tab):
        tb = Table(title=f"largest spikes (top {min(top, len(tab))} by area)", title_justify="left")
        for c in ("step", "rows", "peak", "width", "area", "baseline"):
            tb.add_column(c, justify="right")
        for _, r in tab.sort_values("area", ascending=False).head(top).iterrows():
            tb.add_row(str(int(r["step"])), str(int(r["rows"])), f"{r['peak']:+.3f}", str(int(r["width"])),
                       f"{r['area']:+.3f}", f"{r['baseline']:.3f}")
        con.print(tb)
    con.print("plots: " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamkv.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ref", type=Path, default=None, help="reference run dir (same text), e.g. strict streaming")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/diagnose)")
    ap.add_argument("--k", type=int, default=SP.SPIKE_K, help="tokens after a prune that belong to its spike")
    ap.add_argument("--threshold", type=float, default=SP.SPIKE_THRESHOLD, help="excess (nats) counted in a width")
    ap.add_argument("--smooth", type=int, default=64, help="rolling-mean window of the NLL curves")
    ap.add_argument("--top", type=int, default=10, help="largest spikes listed")
    args = ap.parse_args(argv)
    try:
        if args.k < 1 or args.smooth < 1:
            raise DiagnoseError("--k and --smooth: must be >= 1")
        run = load_run(args.run_dir)
        ref = load_run(args.ref) if args.ref else None
        a = analyse(run, ref, k=args.k, threshold=args.threshold)
    except DiagnoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or (args.run_dir / "diagnose")
    paths = plot(run, a, ref, out, args.smooth)
    a["table"].to_csv(out / "spikes.csv", index=False)
    a["by_age"].to_csv(out / "by_age.csv", index=False)
    a["by_visible"].to_csv(out / "by_visible.csv", index=False)
    print_report(run, a, paths, top=args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
