"""The whole analysis in one call: collect -> filter -> summarise -> verdicts -> plots -> report files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import plots, references
from . import passkey_report
from .collect import AnalysisError, collect, write_runs
from .passkey import DEFAULT_ACC_MIN, PASSKEY
from .report import Document, context_note, devices_caption, display, summary_view
from .select import apply_where, check_columns, norm, norm_series, parse_spec
from .summarize import (DEFAULT_BASELINE, DEFAULT_IGNORE, DEFAULT_MATCH, DEFAULT_PARETO_BY, Summary, config_label,
                        group_columns, summarize, varying, write_summary)
from .verdict import Finding, recommend, verdicts

STATUS_ORDER = ("ok", "failed", "incomplete")


@dataclass
class Options:
    paths: list[str]
    out: Path = Path("report")
    where: list[str] = field(default_factory=list)
    group_by: list[str] | None = None
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    baseline: str = DEFAULT_BASELINE
    match: list[str] | None = None  # None: DEFAULT_MATCH, or references.DENSE_MATCH for --baseline policy=full
    pareto_by: list[str] = field(default_factory=lambda: list(DEFAULT_PARETO_BY))
    lazy: str = "policy=streaming"
    short_ppl_max: float = 3.0
    long_ppl_max: float = 5.0   # the book (long text) protocol's verdict limit
    wiki_ppl_max: float = 3.0
    passkey_acc_min: float = DEFAULT_ACC_MIN  # a pass-key config "retrieves" old keys at this accuracy
    traces: int = 4
    trace_runs: list[str] = field(default_factory=list)
    rolling: int = 64


@dataclass
class Result:
    runs: pd.DataFrame
    summary: Summary
    findings: list[Finding]
    plots: list[Path]
    traces: list[str]   # run directories whose NLL / visible-KV traces were drawn
    warnings: list[str]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _validate(opts: Options, runs: pd.DataFrame, group_cols: list[str]) -> tuple[dict, dict]:
    baseline = parse_spec(opts.baseline, "--baseline")
    lazy = parse_spec(opts.lazy, "--lazy-prune")
    if not (runs["status"] == "ok").any():
        return baseline, lazy  # nothing to summarise: report the failed/incomplete runs only
    check_columns(runs, baseline, "--baseline")
    check_columns(runs, lazy, "--lazy-prune")
    if opts.match is not None:
        check_columns(runs, [c for c in opts.match if not c.endswith(".*")], "--match")
    check_columns(runs, opts.pareto_by, "--pareto-by")
    for k in baseline:
        if k not in group_cols:
            raise AnalysisError(f"--baseline: '{k}' is not a grouping column ({', '.join(group_cols)})")
    if opts.traces < 0 or opts.rolling < 1:
        raise AnalysisError("--traces must be >= 0 and --rolling >= 1")
    return baseline, lazy


def _representative(runs: pd.DataFrame, row: pd.Series, group_cols: list[str]) -> pd.Series | None:
    """The first ok run (lowest repeat, seed, path) of a config that has a tokens.parquet."""
    ok = runs[runs["status"] == "ok"]
    for c in group_cols:
        ok = ok[norm_series(ok[c]) == norm(row[c])]
    sort = [c for c in ("repeat", "seed", "path") if c in ok]
    for _, r in ok.sort_values(sort, kind="mergesort").iterrows():
        if (Path(r["path"]) / "tokens.parquet").is_file():
            return r
    return None


def _choose_traces(opts: Options, runs: pd.DataFrame, s: Summary) -> tuple[list[pd.Series], list[str]]:
    warn = []
    if opts.trace_runs:
        chosen = []
        for p in opts.trace_runs:
            path = str(Path(p).resolve())
            hit = runs[runs["path"].map(lambda q: str(Path(q).resolve())) == path]
            if hit.empty:
                raise AnalysisError(f"--trace-runs: {p} is not one of the analysed run directories")
            if not (Path(path) / "tokens.parquet").is_file():
                warn.append(f"trace run {p} has no tokens.parquet; skipped")
                continue
            chosen.append(hit.iloc[0])
        return chosen, warn
    # Per scope: the baseline, the Pareto configs (fastest first), the best lazy prune; scopes taken in turn.
    lists = []
    t = s.table
    scope = (t[s.pareto_by].apply(lambda r: tuple(norm(v) for v in r), axis=1) if s.pareto_by
             else pd.Series([()] * len(t), index=t.index))
    for key in sorted(set(scope)):
        g = t[scope == key]
        lazy = g[g["lazy_prune"]].sort_values("tpot_ms_median", kind="mergesort").head(1)
        order = pd.concat([g[g["is_baseline"]], g[g["pareto"]].sort_values("tpot_ms_median", kind="mergesort"), lazy])
        lists.append(list(dict.fromkeys(order.index)))
    picked: list[int] = []
    for i in range(max((len(x) for x in lists), default=0)):
        picked += [x[i] for x in lists if i < len(x) and x[i] not in picked]
    if not picked:  # no baseline/Pareto/lazy config (e.g. no baseline at all): the first configs
        picked = list(t.index)
    chosen = []
    for i in picked:
        if len(chosen) >= opts.traces:
            break
        r = _representative(runs, t.loc[i], s.group_cols)
        if r is not None:
            chosen.append(r)
    return chosen, warn


def _load_trace(r: pd.Series, label: str):
    d = Path(r["path"])
    tok = pd.read_parquet(d / "tokens.parquet")
    ev = pd.read_parquet(d / "events.parquet") if (d / "events.parquet").is_file() else None
    return label, tok, ev


def make_plots(opts: Options, runs: pd.DataFrame, s: Summary,
               group_cols: list[str]) -> tuple[list[Path], list[str], list[str], list[str], dict]:
    """Write all figures under out/plots (stale PNG/SVG there removed first); return PNGs, their
    captions, the traced run dirs, warnings, and report blocks to show under a PNG (zoom keys)."""
    pdir = opts.out / "plots"
    if pdir.is_dir():
        for f in sorted(pdir.iterdir()):
            if f.suffix in (".png", ".svg"):
                f.unlink()
    t = s.table
    pngs, captions, warn = [], [], []
    multi_dev = "device_name" in t and norm_series(t["device_name"]).nunique() > 1
    facets = ["model"] + (["device_name"] if multi_dev else [])
    vary = varying(t, group_cols)
    label_cols = [c for c in vary if c not in ("model", "dataset", "device_name", "policy", "cache", "backend")]
    datasets = sorted(set(norm_series(t["dataset"]))) if "dataset" in t and len(t) else []
    extras: dict[Path, list] = {}
    # Pass-key configs are one per text length and depth: their PPL Pareto is the pass-key section's job.
    for d in [d for d in datasets if d != PASSKEY]:
        g = t[norm_series(t["dataset"]) == d]
        fig = plots.pareto_plot(g, f"dataset {d}", label_cols, facets)
        pngs.append(plots.save(fig, pdir, f"pareto_{_slug(d)}"))
        captions.append(f"Pareto: dataset {d} (ringed: baseline; dashed: Pareto frontier; dotted box: the "
                        "zoomed area, if any)")
        key = plots.zoom_key(g, label_cols, facets)
        if len(key):
            extras[pngs[-1]] = [("table", display(key), "The numbered points of the zoomed panel.")]
    if plots.has_regimes(t):
        series = [c for c in vary if c not in ("model", "dataset", "device_name", "policy", "compress_every", "window")]
        fig = plots.regime_plot(t, ["model", "dataset"] + (["device_name"] if multi_dev else []), series)
        pngs.append(plots.save(fig, pdir, "regime_map"))
        captions.append("Regime map: median PPL vs R/W per window (one line per policy; dashed grey: the dense run)")
    if "compress_every" in t and t["compress_every"].notna().any():
        series = [c for c in vary if c not in ("model", "dataset", "device_name", "policy", "compress_every")]
        fig = plots.tpot_vs_compress_plot(t, ["model", "dataset"] + (["device_name"] if multi_dev else []), series)
        pngs.append(plots.save(fig, pdir, "tpot_vs_compress_every"))
        captions.append("Median TPOT vs compress_every")
    chosen, trace_warn = _choose_traces(opts, runs, s)
    warn += trace_warn
    tvary = [c for c in varying(runs, group_cols) if c != "device_name"] or ["policy"]
    traces, ok_chosen = [], []
    for r in chosen:
        try:
            traces.append(_load_trace(r, config_label(r, tvary)))
            ok_chosen.append(r)
        except Exception as e:  # a damaged parquet loses its trace, not the report
            warn.append(f"trace of {r['path']} skipped: {type(e).__name__}: {e}")
    chosen = ok_chosen
    if chosen:
        pngs.append(plots.save(plots.trace_plot(traces, opts.rolling), pdir, "nll_traces"))
        captions.append(f"NLL per token (rolling mean of {opts.rolling}) with prunes")
        pngs.append(plots.save(plots.visible_kv_plot(traces), pdir, "visible_kv"))
        captions.append("Visible KV per token (traced runs: " + ", ".join(f"`{r['path']}`" for r in chosen) + ")")
    elif (opts.traces or opts.trace_runs) and len(t):
        warn.append("no NLL traces: no chosen ok run has a tokens.parquet")
    return pngs, captions, [str(r["path"]) for r in chosen], warn, extras


def _findings_table(fs: list[Finding], scope_cols: list[str]) -> pd.DataFrame:
    rows = [{**{c: f.scope.get(c, "") for c in scope_cols}, "scenario": f.kind, "outcome": f.outcome,
             "evidence": f.reason} for f in fs]
    return pd.DataFrame(rows, columns=scope_cols + ["scenario", "outcome", "evidence"])


def run(opts: Options) -> Result:
    runs, cfg_cols, _ = collect(opts.paths)
    runs["beyond_context"] = references.beyond_context(runs)
    runs = apply_where(runs, opts.where)
    if runs.empty:
        raise AnalysisError("no runs left after --where " + " ".join(opts.where))
    group_cols = group_columns(runs, cfg_cols, opts.group_by, opts.ignore)
    baseline, lazy = _validate(opts, runs, group_cols)
    s = summarize(runs, group_cols, baseline, opts.match, opts.pareto_by, lazy)
    opts.out.mkdir(parents=True, exist_ok=True)
    write_runs(runs, opts.out)
    write_summary(s, opts.out)
    findings = verdicts(s, opts.long_ppl_max, opts.wiki_ppl_max) + recommend(s, opts.short_ppl_max)
    pngs, captions, traced, plot_warn, extras = make_plots(opts, runs, s, group_cols)
    pk_pngs, _, pk_blocks, pk_warn = passkey_report.section(runs, group_cols, opts.out, opts.passkey_acc_min)
    warnings = list(s.warnings) + plot_warn + pk_warn
    _write_summary_md(opts, s, warnings)
    _write_report(opts, runs, s, findings, pngs, captions, warnings, extras, pk_blocks)
    return Result(runs, s, findings, pngs + pk_pngs, traced, warnings)


def _settings_blocks(opts: Options, s: Summary) -> list:
    spec = ",".join(f"{k}={v}" for k, v in s.baseline.items())
    return [("ul", [f"Baseline: `{spec}`, matched on {', '.join(f'`{k}`' for k in s.match)}",
                    f"Grouped by: {', '.join(f'`{c}`' for c in s.group_cols)} (medians over the other runs)",
                    f"Pareto scope: {', '.join(f'`{c}`' for c in s.pareto_by) or 'all'};"
                    " minimise `tpot_ms_median` and `ppl_increase_pct`",
                    "Filters: " + (" ".join(f"`{w}`" for w in opts.where) if opts.where else "none")])]


def _summary_blocks(s: Summary) -> list:
    view, common = summary_view(s.table, s.group_cols)
    blocks = []
    if common:
        blocks.append(("p", "Common to all configs: " + ", ".join(f"`{k}={v}`" for k, v in common.items())))
    note = context_note(s.table)
    blocks.append(("table", view, devices_caption(s.table) + (f"\n\n{note}" if note else "")))
    return blocks


def _write_summary_md(opts: Options, s: Summary, warnings: list[str]) -> None:
    blocks = _settings_blocks(opts, s) + _summary_blocks(s)
    if warnings:
        blocks += [("h", 2, "Warnings"), ("ul", warnings)]
    Document("streamkv summary", blocks).write(opts.out, "summary", html_too=False)


def _write_report(opts: Options, runs: pd.DataFrame, s: Summary, findings: list[Finding], pngs: list[Path],
                  captions: list[str], warnings: list[str], extras: dict, passkey_blocks: list) -> None:
    counts = {st: int((runs["status"] == st).sum()) for st in STATUS_ORDER}
    other = sorted(set(runs["status"]) - set(STATUS_ORDER))
    counts.update({st: int((runs["status"] == st).sum()) for st in other})
    inputs = ", ".join(f"`{p}`" for p in opts.paths)
    blocks: list = [("p", f"Inputs: {inputs}. Runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "."),
                    ("p", devices_caption(runs))]
    blocks += _settings_blocks(opts, s)
    scope_cols = s.pareto_by
    verdict_fs = [f for f in findings if f.kind.startswith("verdict")]
    rec_fs = [f for f in findings if not f.kind.startswith("verdict")]
    blocks += [("h", 2, "Go/no-go verdict"),
               ("p", f"Book protocol (book, pg19): PPL increase <= {opts.long_ppl_max:g} % with TPOT below the best "
                     f"plain lazy prune; wiki protocol (wiki, wikitext): PPL increase <= {opts.wiki_ppl_max:g} % "
                     "with lower TPOT than the best plain lazy prune. Candidates: every config that is neither "
                     f"the baseline nor a plain lazy prune (`{opts.lazy}` with compress_every > 1), each "
                     "compared with the best lazy prune on its own decode path (`backend_used`)."),
               ("table", _findings_table(verdict_fs, scope_cols), devices_caption(s.table)),
               ("h", 2, "Recommended configs"),
               ("p", f"Short text: the fastest config with PPL increase <= {opts.short_ppl_max:g} %. Long text: the "
                     "lowest PPL increase among configs with TPOT below the best plain lazy prune on their decode path."),
               ("table", _findings_table(rec_fs, scope_cols), devices_caption(s.table))]
    if warnings:
        blocks += [("h", 2, "Warnings"), ("ul", warnings)]
    blocks += [("h", 2, "Summary (medians over repeats)")] + _summary_blocks(s)
    blocks += passkey_blocks
    blocks += [("h", 2, "Plots")]
    for png, cap in zip(pngs, captions):
        blocks += [("p", f"**{cap}**"), ("img", str(png.relative_to(opts.out)), cap)] + extras.get(png, [])
    bad = runs[runs["status"] != "ok"]
    lab_cols = [c for c in varying(runs, s.group_cols) if c != "device_name"] or [c for c in ("policy",) if c in runs]
    bad_view = pd.DataFrame({"status": bad["status"], "config": [config_label(r, lab_cols) for _, r in bad.iterrows()],
                             "error_type": bad["error_type"], "error": bad["error"], "path": bad["path"]})
    blocks += [("h", 2, "Failed and incomplete runs"),
               ("table", display(bad_view.reset_index(drop=True)), devices_caption(bad))]
    Document("streamkv analysis report", blocks).write(opts.out, "report")
