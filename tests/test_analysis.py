"""The analysis stage on hand-made run records with known values (tests/synthetic_records.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import synthetic_records as syn
from analysis import Options, run
from analysis import plots
from analysis.__main__ import main
from analysis.collect import AnalysisError, collect, find_run_dirs
from analysis.summarize import pareto_mask

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("runs.parquet", "runs.csv", "summary.parquet", "summary.csv", "summary.md", "report.md", "report.html")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    a = syn.write_sweep(root / "book_sweep", syn.BOOK)
    b = syn.write_sweep(root / "wiki_sweep", syn.WIKI, failed=False, incomplete=False)
    return a, b


@pytest.fixture(scope="module")
def result(sweeps, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return run(Options(paths=[str(p) for p in sweeps], out=out)), out


def row(t: pd.DataFrame, **kw) -> pd.Series:
    m = pd.Series(True, index=t.index)
    for k, v in kw.items():
        m &= t[k].astype(object).map(lambda x: None if pd.isna(x) else x) == v
    assert m.sum() == 1, (kw, m.sum())
    return t[m].iloc[0]


# ------------------------------------------------------------------ collection

def test_finds_runs_recursively_and_keeps_status(sweeps):
    dirs = find_run_dirs(sweeps)
    n_book = sum(len(r) for _, r in syn.BOOK) + 2
    n_wiki = sum(len(r) for _, r in syn.WIKI)
    assert len(dirs) == n_book + n_wiki
    runs, cfg_cols, _ = collect(sweeps)
    assert runs["status"].value_counts().to_dict() == {"ok": n_book - 2 + n_wiki, "failed": 1, "incomplete": 1}
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert failed["error_type"] == "OutOfMemoryError" and failed["policy.max_drop"] == 32
    inc = runs[runs["status"] == "incomplete"].iloc[0]
    assert inc["compress_every"] == 64 and inc["dataset"] == "book"  # config read from .hydra/config.yaml
    for c in ("model", "dataset", "policy", "policy.max_drop", "cache", "backend", "n_sink", "window",
              "compress_every", "prefill_tokens", "seed", "repeat", "dtype", "device"):
        assert c in cfg_cols
    # ints stay ints despite missing knobs; metrics never clobber the config's prefill_tokens
    assert str(runs["policy.max_drop"].dtype) == "Int64"
    assert "metric.prefill_tokens" in runs and "tpot_ms" in runs and "device_name" in runs


# ------------------------------------------------------------------ summary numbers

def test_medians_increase_speedup_exact(result):
    res, _ = result
    t = res.summary.table
    assert len(t) == len(syn.BOOK) + len(syn.WIKI)  # one row per config, repeats/seeds pooled
    base = row(t, dataset="book", policy="streaming", compress_every=1, window=32)
    assert base["count"] == 3 and base["tpot_ms_median"] == 11.0 and base["ppl_median"] == 20.0
    assert (base["tpot_ms_min"], base["tpot_ms_max"], base["ppl_min"], base["ppl_max"]) == (10.0, 12.0, 19.8, 20.2)
    assert base["is_baseline"] and base["ppl_increase_pct"] == 0.0 and base["tpot_speedup"] == 1.0
    lazy4 = row(t, dataset="book", policy="streaming", compress_every=4, window=32)
    assert lazy4["count"] == 3 and lazy4["tpot_ms_median"] == 6.0
    assert lazy4["ppl_increase_pct"] == pytest.approx(100 * (20.4 / 20.0 - 1), abs=1e-12)
    assert lazy4["tpot_speedup"] == pytest.approx(11.0 / 6.0, abs=1e-12)
    seed = row(t, dataset="book", policy="controlled", **{"policy.max_drop": 8})
    assert seed["ppl_increase_pct"] == pytest.approx(2.5, abs=1e-12)
    assert seed["tpot_speedup"] == pytest.approx(11.0 / 3.5, abs=1e-12)
    wiki = row(t, dataset="wiki", policy="controlled")
    assert wiki["ppl_increase_pct"] == pytest.approx(4.0, abs=1e-12) and wiki["baseline_tpot_ms_median"] == 10.0


def test_pareto_set(result):
    t = result[0].summary.table
    got = {(r.dataset, r.policy, int(r.compress_every), int(r.window),
            None if pd.isna(r["policy.max_drop"]) else int(r["policy.max_drop"]))
           for _, r in t[t["pareto"]].iterrows()}
    assert got == {("book", "streaming", 1, 32, None), ("book", "streaming", 4, 32, None),
                   ("book", "controlled", 4, 32, 8),
                   ("wiki", "streaming", 1, 32, None), ("wiki", "streaming", 4, 32, None),
                   ("wiki", "controlled", 4, 32, 8)}


def test_pareto_mask_definition():
    x = pd.Series([1.0, 2.0, 2.0, 3.0, 1.0, float("nan")])
    y = pd.Series([5.0, 2.0, 2.0, 3.0, 6.0, 0.0])
    # (2,2) twice: ties both optimal; (3,3) dominated by (2,2); (1,6) dominated by (1,5); NaN never optimal
    assert pareto_mask(x, y).tolist() == [True, True, True, False, False, False]


def test_missing_baseline_reported_not_guessed(result):
    res, out = result
    w64 = row(res.summary.table, dataset="book", window=64)
    assert math.isnan(w64["ppl_increase_pct"]) and math.isnan(w64["tpot_speedup"]) and not w64["pareto"]
    assert any("no baseline" in w and "window=64" in w for w in res.warnings)
    for f in ("report.md", "summary.md"):
        text = (out / f).read_text()
        assert "no baseline config" in text and "window=64" in text


def test_ambiguous_baseline_is_not_guessed(tmp_path):
    # Two baselines that differ only in a column outside --match and the narrowing context: cache is a
    # method column, so both stay candidates -> NaN with a warning.
    spec = [(dict(dataset="wiki", policy="streaming", compress_every=1, cache="a"), [(10.0, 10.0)]),
            (dict(dataset="wiki", policy="streaming", compress_every=1, cache="b"), [(9.0, 11.0)]),
            (dict(dataset="wiki", policy="streaming", compress_every=4, cache="a"), [(5.0, 10.5)])]
    syn.write_sweep(tmp_path / "s", spec, failed=False, incomplete=False)
    res = run(Options(paths=[str(tmp_path / "s")], out=tmp_path / "r", traces=0))
    assert res.summary.table["ppl_increase_pct"].isna().all()
    assert any("ambiguous" in w for w in res.warnings)
    # naming the cache as a match key resolves it
    res = run(Options(paths=[str(tmp_path / "s")], out=tmp_path / "r", traces=0,
                      match=["model", "dataset", "n_sink", "window", "device_name", "cache"]))
    lazy = row(res.summary.table, compress_every=4)
    assert lazy["ppl_increase_pct"] == pytest.approx(5.0)


def test_verdicts_and_recommendations(result):
    fs = {(f.scope["dataset"], f.kind): f for f in result[0].findings}
    book = fs[("book", "verdict (book protocol)")]
    assert book.outcome == "GO" and "max_drop=8" in book.reason
    assert book.numbers["lazy_tpot_ms"] == 4.0 and book.numbers["tpot_ms"] == 3.5
    wiki = fs[("wiki", "verdict (wiki protocol)")]
    assert wiki.outcome == "NO-GO" and wiki.numbers["ppl_increase_pct"] == pytest.approx(4.0)
    assert wiki.numbers["lazy_tpot_ms"] == 5.0
    assert "max_drop=8" in fs[("book", "short text")].outcome
    assert fs[("wiki", "short text")].outcome.startswith("policy=streaming") and \
        "compress_every=4" in fs[("wiki", "short text")].outcome
    assert "max_drop=8" in fs[("wiki", "long text")].outcome  # 4 % but the only one below 5 ms
    report = (result[1] / "report.md").read_text()
    assert "| GO |" in report and "| NO-GO |" in report and "4.00 ms" in report


def test_thresholds_configurable(sweeps, tmp_path):
    res = run(Options(paths=[str(sweeps[1])], out=tmp_path, wiki_ppl_max=4.5, traces=0))
    (v,) = [f for f in res.findings if f.kind.startswith("verdict")]
    assert v.outcome == "GO"


# ------------------------------------------------------------------ outputs

def test_outputs_written(result):
    out = result[1]
    for f in OUTPUTS:
        assert (out / f).stat().st_size > 0, f
    s = pd.read_csv(out / "summary.csv")
    for c in ("model", "dataset", "policy", "cache", "backend", "n_sink", "window", "compress_every", "count",
              "tpot_ms_median", "ppl_median", "ppl_increase_pct", "tpot_speedup", "pareto"):
        assert c in s.columns, c
    assert "repeat" not in s.columns and "seed" not in s.columns
    runs = pd.read_parquet(out / "runs.parquet")
    assert set(runs["status"]) == {"ok", "failed", "incomplete"}
    report = (out / "report.md").read_text()
    assert "OutOfMemoryError" in report and "incomplete" in report and "Devices: Synthetic CPU" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(result[0].plots) and "<img" in html
    for name in ("pareto_book", "pareto_wiki", "tpot_vs_compress_every", "nll_traces", "visible_kv"):
        for ext in ("png", "svg"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000, name
        assert f"plots/{name}.png" in report


def test_pareto_plot_objects(result):
    t = result[0].summary.table
    book = t[t["dataset"] == "book"]
    fig = plots.pareto_plot(book, "dataset book", ["window", "compress_every", "policy.max_drop"])
    (ax,) = fig.axes[:1]
    assert ax.get_xlabel() == "TPOT (ms)" and ax.get_ylabel() == "PPL increase vs baseline (%)"
    # one point per config that has a PPL increase (window 64 has no baseline)
    assert plots.configs_in(fig) == len(book) - 1 == book["ppl_increase_pct"].notna().sum()
    (front,) = [ln for ln in ax.lines if ln.get_gid() == "frontier"]
    # the staircase: top of the plot, the Pareto points by TPOT, then flat to the slowest config
    assert list(front.get_xdata()) == [3.5, 3.5, 6.0, 11.0, 11.0]
    assert list(front.get_ydata()) == pytest.approx([5.0, 2.5, 2.0, 0.0, 0.0])
    (base,) = [c for c in ax.collections if c.get_gid() == "baseline"]
    assert base.get_offsets().tolist() == [[11.0, 0.0]]
    # labels name what varies among the plotted points (window 32 for all of them: left out)
    assert any(txt.get_text() == "R4" for txt in ax.texts)
    assert not any("w32" in txt.get_text() for txt in ax.texts)
    plots.plt.close(fig)


def test_trace_and_tpot_plot_objects(sweeps):
    d = sweeps[0] / "3"  # book, streaming R=4, repeat 0
    tok, ev = pd.read_parquet(d / "tokens.parquet"), pd.read_parquet(d / "events.parquet")
    fig = plots.trace_plot([("r4", tok, ev)], rolling=8)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "token index" and ax.get_ylabel().startswith("NLL")
    (ln,) = [x for x in ax.lines if x.get_gid() == "nll:r4"]
    assert len(ln.get_xdata()) == len(tok)
    assert ln.get_ydata()[7] == pytest.approx(tok["nll"].astype(float).iloc[:8].mean(), rel=1e-6)
    (pr,) = [c for c in ax.collections if c.get_gid() == "prunes:r4"]
    assert len(pr.get_segments()) == len(ev)
    plots.plt.close(fig)
    fig = plots.visible_kv_plot([("r4", tok, ev)])
    assert fig.axes[0].get_ylabel() == "visible KV (tokens)"
    plots.plt.close(fig)


def test_tpot_vs_compress_plot(result):
    t = result[0].summary.table
    fig = plots.tpot_vs_compress_plot(t, ["model", "dataset"], ["window", "policy.max_drop"])
    assert [a.get_xlabel() for a in fig.axes] == ["compress_every (R)"] * 2
    n_points = sum(len(ln.get_xdata()) for a in fig.axes for ln in a.lines if (ln.get_gid() or "").startswith("series:"))
    assert n_points == len(t)
    plots.plt.close(fig)


def test_merge_and_filters(sweeps, tmp_path):
    res = run(Options(paths=[str(sweeps[0]), str(sweeps[1])], out=tmp_path / "m", traces=0,
                      where=["dataset=wiki"]))
    assert set(res.summary.table["dataset"]) == {"wiki"}
    res = run(Options(paths=[str(sweeps[0])], out=tmp_path / "g", traces=0, where=["policy!=controlled"],
                      group_by=["dataset", "policy", "compress_every", "window", "n_sink", "model", "device_name"]))
    assert set(res.summary.table["policy"]) == {"streaming"}
    assert "cache" not in res.summary.table


def test_no_ok_runs_still_reports(tmp_path):
    syn.write_sweep(tmp_path / "s", [], failed=False, incomplete=False)
    syn.write_run(tmp_path / "s" / "0", syn.config(), {}, status="failed", error={"type": "E", "message": "boom"})
    syn.write_run(tmp_path / "s" / "1", syn.config(compress_every=4), status=None)
    (tmp_path / "s" / "2").mkdir()
    (tmp_path / "s" / "2" / "result.json").write_text("{truncated")
    res = run(Options(paths=[str(tmp_path / "s")], out=tmp_path / "r"))
    assert res.summary.table.empty and res.traces == []
    assert res.runs["status"].tolist() == ["failed", "incomplete", "failed"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "boom" in report and "UnreadableResult" in report and "no result.json" in report


def test_trace_runs_option(sweeps, tmp_path):
    chosen = [sweeps[0] / "0", sweeps[1] / "1"]
    res = run(Options(paths=[str(p) for p in sweeps], out=tmp_path, trace_runs=[str(p) for p in chosen]))
    assert (tmp_path / "plots" / "nll_traces.png").is_file()
    assert res.traces == [str(p.resolve()) for p in chosen]
    with pytest.raises(AnalysisError, match="not one of the analysed"):
        run(Options(paths=[str(sweeps[1])], out=tmp_path, trace_runs=[str(sweeps[0] / "0")]))
    assert len(res.plots) == 5


def test_determinism(sweeps, tmp_path):
    outs = []
    for name in ("a", "b", "a"):  # the third run regenerates "a" in place
        out = tmp_path / name
        run(Options(paths=[str(sweeps[1]), str(sweeps[0])], out=out, traces=1))
        outs.append({f: (out / f).read_bytes() for f in ("summary.csv", "summary.md", "runs.csv")}
                    | {"svg": (out / "plots" / "pareto_book.svg").read_bytes()})
    assert outs[0] == outs[1] == outs[2]


def test_cli_errors(sweeps, tmp_path, capsys):
    assert main([str(tmp_path / "nothing_here"), "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert main([str(sweeps[1]), "--out", str(tmp_path / "r"), "--where", "datset=wiki"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("streamkv-analysis: error:") for e in err)
    assert "did you mean dataset" in err[2]
    with pytest.raises(AnalysisError):
        run(Options(paths=[str(sweeps[1])], out=tmp_path / "r", baseline="polcy=streaming"))


def test_cli_module_smoke(sweeps, tmp_path):
    out = tmp_path / "R"
    p = subprocess.run([sys.executable, "-m", "analysis", str(sweeps[1]), "--out", str(out), "--traces", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert all((out / f).is_file() for f in OUTPUTS)


def test_flatten_config_drops_non_config_keys_and_unused_tiny_fields():
    from analysis.collect import flatten_config

    base = {"policy": {"name": "streaming"}, "window": 8, "progress": False, "rerun": True}
    gguf = flatten_config({**base, "model": {"name": "smollm2_135m", "kind": "gguf", "hidden_size": 64}})
    assert "progress" not in gguf and "rerun" not in gguf  # never split a group
    assert gguf["model"] == "smollm2_135m" and "model.hidden_size" not in gguf
    assert gguf["policy"] == "streaming" and gguf["window"] == 8
    tiny = flatten_config({**base, "model": {"name": "tiny_llama", "kind": "tiny_llama", "hidden_size": 64}})
    assert tiny["model.hidden_size"] == 64  # it shapes the tiny model: kept


def test_pareto_plot_many_configs_and_outliers():
    n = 15  # > MAX_LABELS: only the frontier and the baseline get a label; a +250 % outlier: symlog axis
    t = pd.DataFrame({"model": "m", "policy": ["streaming"] * (n - 1) + ["h2o"], "cache": "ring",
                      "backend": "eager", "compress_every": list(range(1, n + 1)),
                      "tpot_ms_median": [1.0 + 0.01 * i for i in range(n)],
                      "ppl_increase_pct": [0.0] + [0.1 * i for i in range(1, n - 1)] + [250.0]})
    t["pareto"] = t.index == 0
    t["is_baseline"] = t.index == 0
    fig = plots.pareto_plot(t, "many", ["compress_every"])
    ax = fig.axes[0]
    assert [txt.get_text() for txt in ax.texts] == ["R1"]
    assert ax.get_yscale() == "symlog"
    assert ax.get_xscale() == "linear"  # TPOT spans 1.0-1.14 ms
    plots.plt.close(fig)
    t.loc[n - 1, "tpot_ms_median"] = 30.0  # an eager run next to ~1 ms graph runs: log TPOT axis
    fig = plots.pareto_plot(t, "many", ["compress_every"])
    assert fig.axes[0].get_xscale() == "log"
    plots.plt.close(fig)


def test_runs_that_fell_back_to_eager_are_their_own_config(tmp_path):
    """A graph backend runs an unschedulable policy on the eager path: backend_used keeps those runs out of
    the graph runs' medians (same config, different decode path)."""
    cfg = syn.config(policy="adaptive", backend="cudagraph", cache="ring")
    syn.write_run(tmp_path / "0", cfg, syn.metrics(1.0, 20.0), backend_used="cudagraph")
    syn.write_run(tmp_path / "1", {**cfg, "repeat": 1}, syn.metrics(30.0, 20.0),
                  backend_used="eager (fallback from cudagraph)")
    res = run(Options(paths=[str(tmp_path)], out=tmp_path / "report", traces=0))
    t = res.summary.table
    assert sorted(t["backend_used"]) == ["cudagraph", "eager (fallback from cudagraph)"]
    assert sorted(t["tpot_ms_median"]) == [1.0, 30.0] and (t["count"] == 1).all()


def test_verdict_compares_on_the_same_decode_path(tmp_path):
    """A candidate on a faster backend with no lazy prune of its own is not judged against lazy prunes of
    a slower backend: the verdict rests on the same-path comparison."""
    spec = [(dict(dataset="book", policy="streaming", compress_every=1), [(10.0, 10.0)]),
            (dict(dataset="book", policy="streaming", compress_every=8), [(8.0, 10.1)]),
            (dict(dataset="book", policy="max_drop", compress_every=8, max_drop=4), [(8.5, 10.05)]),
            (dict(dataset="book", policy="max_drop", compress_every=8, max_drop=4, backend="fast"), [(2.0, 10.05)])]
    syn.write_sweep(tmp_path / "s", spec, failed=False, incomplete=False)
    res = run(Options(paths=[str(tmp_path / "s")], out=tmp_path / "r", traces=0))
    (v,) = [f for f in res.findings if f.kind.startswith("verdict")]
    # on eager the candidate (8.5 ms) is slower than the lazy prune (8.0 ms); the 2.0 ms one has no lazy prune
    assert v.outcome == "NO-GO" and v.numbers["tpot_ms"] == 8.5 and v.numbers["lazy_tpot_ms"] == 8.0
    (long,) = [f for f in res.findings if f.kind == "long text"]
    assert long.outcome == "none"
    # a lazy prune on the fast path makes the fast candidate comparable: it beats it -> GO
    spec2 = [(dict(dataset="book", policy="streaming", compress_every=8, backend="fast"), [(2.5, 10.1)])]
    syn.write_sweep(tmp_path / "s2", spec2, failed=False, incomplete=False)
    res = run(Options(paths=[str(tmp_path / "s"), str(tmp_path / "s2")], out=tmp_path / "r2", traces=0))
    (v,) = [f for f in res.findings if f.kind.startswith("verdict")]
    assert v.outcome == "GO" and v.numbers["tpot_ms"] == 2.0 and v.numbers["lazy_tpot_ms"] == 2.5


def test_repeats_with_unstable_tpot_are_flagged(tmp_path):
    # eager decode on a shared host can measure 2x apart between repeats: the median alone would hide it
    spec = [(dict(dataset="wiki", policy="streaming", compress_every=1), [(1.00, 10.0), (1.01, 10.0)]),
            (dict(dataset="wiki", policy="streaming", compress_every=4), [(24.0, 10.1), (47.0, 10.1)]),
            (dict(dataset="wiki", policy="streaming", compress_every=8), [(5.0, 10.2)])]
    syn.write_sweep(tmp_path / "s", spec, failed=False, incomplete=False)
    res = run(Options(paths=[str(tmp_path / "s")], out=tmp_path / "r", traces=0))
    flagged = [w for w in res.warnings if w.startswith("TPOT varies")]
    assert len(flagged) == 1 and "of 1 config " in flagged[0]
    assert "compress_every=4: 24-47 ms" in flagged[0] and "compress_every=1" not in flagged[0]
    assert flagged[0] in (tmp_path / "r" / "summary.md").read_text()


def test_knobs_added_later_group_with_records_made_before_them():
    # records from before policy.positions / policy.refresh_keep existed and records at their old
    # behaviour fall into one config group; another value stays a column
    from analysis.collect import flatten_config

    old = flatten_config({"policy": {"name": "snapkv", "obs_window": 8}})
    for knobs in ({"positions": "original", "refresh_keep": "fifo"}, {"positions": None}):
        assert flatten_config({"policy": {"name": "snapkv", "obs_window": 8, **knobs}}) == old
    assert flatten_config({"policy": {"name": "refresh", "refresh_keep": "score"}})["policy.refresh_keep"] == "score"
