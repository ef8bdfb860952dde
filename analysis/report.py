"""Report documents: a list of blocks rendered both as Markdown (report.md, summary.md) and as one
self-contained HTML page (images inlined as base64 PNG).

Tables are formatted to fixed decimals here, so the same summary gives byte-identical Markdown.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .select import NA, norm

# Markdown/HTML blocks: ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", df, caption)
# | ("img", relative path, alt text).
Block = tuple

CORE = ("model", "dataset", "policy", "cache", "backend", "n_sink", "window", "compress_every")
SUMMARY_SHOW = ("count", "tpot_ms_median", "tpot_ms_min", "tpot_ms_max", "tpot_p50_ms_median", "tpot_p90_ms_median",
                "tpot_steady_ms_median", "ttft_ms_median", "prefill_ms_median",
                "total_s_median", "ppl_median", "ppl_min", "ppl_max", "peak_mem_mb_median", "ppl_increase_pct",
                "ppl_increase_vs_dense_pct", "ppl_increase_vs_strict_pct", "tpot_speedup", "answer_acc_mean",
                "answer_nll_mean", "key_distance_median", "is_baseline", "pareto")
# Shown only where some config has a value and (the reference columns) where they differ from ppl_increase_pct.
OPTIONAL_SHOW = ("ppl_increase_vs_dense_pct", "ppl_increase_vs_strict_pct", "answer_acc_mean", "answer_nll_mean",
                 "key_distance_median")
DAGGER = "†"
CONTEXT_NOTE = (f"{DAGGER} beyond the model's context: the run used RoPE positions >= the model's "
                "max_position_embeddings (`max_position >= model_context`); next to a PPL increase: its reference "
                "(dense) run is.")


def fmt_value(col: str, v) -> str:
    """Fixed formatting per column kind; missing numbers print as `n/a`, missing knobs as empty."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "yes" if v else ""
    if isinstance(v, float) and col != "count":
        if math.isnan(v):
            return "n/a"
        if col.startswith("ppl_increase"):
            return f"{v:+.2f}"
        if col in ("answer_acc_mean", "acc_beyond", "acc_within"):
            return f"{v:.2f}"
        if col == "answer_nll_mean":
            return f"{v:.3f}"
        if col == "tpot_vs_streaming":
            return f"{v:.3f}"
        if col == "tpot_speedup":
            return f"{v:.3f}"
        if col.startswith("ppl"):
            return f"{v:.3f}"
        if "_ms" in col or "_s_" in col or "_mb" in col:
            return f"{v:.2f}"
        return f"{v:.6g}"
    s = norm(v)
    return "" if s == NA else s


def display(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: [fmt_value(c, v) for v in df[c]] for c in df.columns}, columns=list(df.columns))


def summary_view(t: pd.DataFrame, group_cols: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The summary's display form: key columns that vary (plus CORE), the stats; constants split off."""
    common = {}
    keys = []
    for c in group_cols:
        vals = {norm(v) for v in t[c]}
        if c in CORE or len(vals) > 1:
            keys.append(c)
        elif c != "device_name" and vals and (v := vals.pop()) != NA:  # one device: named in the caption
            common[c] = v
    keys = [c for c in keys if c in t]
    stats = [c for c in SUMMARY_SHOW if c in t and (c not in OPTIONAL_SHOW or _informative(t, c))]
    view = display(t[keys + stats])
    _mark_beyond_context(t, view, stats)
    return view, common


def _informative(t: pd.DataFrame, c: str) -> bool:
    v = t[c].astype(float)
    if v.isna().all():
        return False
    if c.startswith("ppl_increase_vs_") and "ppl_increase_pct" in t:
        same = (v == t["ppl_increase_pct"]) | (v.isna() & t["ppl_increase_pct"].isna())
        return not same.all()
    return True


def _true(s: pd.Series) -> pd.Series:
    return s.astype("boolean").fillna(False).astype(bool)


def _mark_beyond_context(t: pd.DataFrame, view: pd.DataFrame, stats: list[str]) -> None:
    """Dagger on the policy of configs beyond the model's context, and on PPL increases whose dense
    reference is (on ppl_increase_pct when the dense column is not shown: it is the baseline)."""
    if view.empty:
        return
    if "beyond_context" in t and "policy" in view:
        m = _true(t["beyond_context"]).to_numpy()
        view.loc[m, "policy"] = view.loc[m, "policy"] + " " + DAGGER
    if "dense_beyond_context" in t:
        col = "ppl_increase_vs_dense_pct" if "ppl_increase_vs_dense_pct" in stats else "ppl_increase_pct"
        if col in view and (col != "ppl_increase_pct" or _same_as_dense(t)):
            m = _true(t["dense_beyond_context"]).to_numpy() & (view[col] != "n/a").to_numpy()
            view.loc[m, col] = view.loc[m, col] + " " + DAGGER


def _same_as_dense(t: pd.DataFrame) -> bool:
    if "ppl_increase_vs_dense_pct" not in t or "ppl_increase_pct" not in t:
        return False
    a, b = t["ppl_increase_vs_dense_pct"].astype(float), t["ppl_increase_pct"].astype(float)
    return bool(((a == b) | (a.isna() & b.isna())).all()) and a.notna().any()


def context_note(t: pd.DataFrame) -> str:
    """The dagger's footnote, when some row carries one."""
    flags = [c for c in ("beyond_context", "dense_beyond_context") if c in t]
    return CONTEXT_NOTE if any(_true(t[c]).any() for c in flags) else ""


def devices_caption(df: pd.DataFrame) -> str:
    names = sorted({norm(v) if norm(v) != NA else "unknown" for v in df["device_name"]}) if "device_name" in df else []
    return "Devices: " + (", ".join(names) if names else "none")


# ---------------------------------------------------------------- rendering

def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(_md_cell(str(c)) for c in cols) + " |",
             "| " + " | ".join("---" for _ in cols) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(str(v)) for v in row) + " |")
    return "\n".join(lines)


def render_md(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]) if b[1] else "_(none)_")
        elif b[0] == "table":
            out.append(md_table(b[1]) + (f"\n\n{b[2]}" if b[2] else ""))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4}"""


def render_html(blocks: list[Block], root: Path, title: str) -> str:
    """One HTML page; `root` is where the images' relative paths start."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>" if b[1] else "<p><i>(none)</i></p>")
        elif b[0] == "table":
            out.append(b[1].to_html(index=False, escape=True, border=0) if not b[1].empty else "<p><i>(none)</i></p>")
            if b[2]:
                out.append(f"<p>{_inline(b[2])}</p>")
        elif b[0] == "img":
            data = base64.b64encode((root / b[1]).read_bytes()).decode("ascii")
            out.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


@dataclass
class Document:
    title: str
    blocks: list[Block]

    def write(self, out: Path, stem: str, html_too: bool = True) -> None:
        (out / f"{stem}.md").write_text(render_md([("h", 1, self.title)] + self.blocks))
        if html_too:
            (out / f"{stem}.html").write_text(render_html([("h", 1, self.title)] + self.blocks, out, self.title))
