"""Pass-key analysis, the dense baseline, beyond_context, timing statistics and the regime map, on
hand-made run records with known values (tests/synthetic_records.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import synthetic_records as syn
from analysis import Options, run
from analysis import passkey as pkm
from analysis import passkey_plots as pkp
from analysis import plots
from analysis.__main__ import main

LENGTHS = (64, 128, 256)
DEPTHS = (0.1, 0.5, 0.9)
SEEDS = (0, 1)
REACH = 4 + 32  # n_sink + window of the evicting configs
# policy -> (config knobs, TPOT ms, PPL, answers a key older than the window for seed 0 / seed 1)
PK_POLICIES = {
    "streaming": (dict(policy="streaming", compress_every=1), 1.0, 12.0, (0, 0)),
    "max_drop": (dict(policy="max_drop", compress_every=8, max_drop=8), 0.9, 12.5, (0, 0)),
    "refresh": (dict(policy="refresh", compress_every=8, refresh_budget=16), 1.25, 11.0, (1, 0)),
    "full": (dict(policy="full", compress_every=1, window=2048), 2.0, 10.0, (1, 1)),
}


def key_distance(length: int, depth: float) -> int:
    return int(round((1 - depth) * length))


def write_passkey_sweep(root):
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, (kw, tpot, ppl, old) in PK_POLICIES.items():
        for length in LENGTHS:
            for depth in DEPTHS:
                for seed in SEEDS:
                    kd = key_distance(length, depth)
                    acc = 1 if kd <= REACH else old[seed]
                    # the dense run uses every position; the evicting ones stay near their cache size
                    max_pos = length - 1 if name == "full" else 47
                    m = syn.passkey_metrics(tpot, acc, kd, 0.1 if acc else 5.0, max_pos, model_context=128, ppl=ppl)
                    d = syn.write_run(root / str(n), syn.passkey_config(length, depth, seed=seed, **kw), m)
                    syn.add_answer_column(d)
                    n += 1
    return root


REGIME_WINDOWS = (32, 64)


def regime_ppl(dataset: str, policy: str, window: int, r: int) -> float:
    base = 20.0 if dataset == "book" else 10.0
    return base + (0.2 if policy == "streaming" else 0.1) * math.log2(r) + (1.0 if window == 32 else 0.0)


def write_regime_sweep(root):
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for ds in ("book", "wiki"):
        for w in REGIME_WINDOWS:
            for r in (1, w // 16, w // 4, w):
                for pol, kw in (("streaming", {}), ("max_drop", {"max_drop": 8})):
                    cfg = syn.config(dataset=ds, policy=pol, window=w, compress_every=r, **kw)
                    syn.write_run(root / str(n), cfg, {**syn.metrics(1.0 + 0.01 * r, regime_ppl(ds, pol, w, r)),
                                                       **syn.timing(1.0)})
                    n += 1
        syn.write_run(root / str(n), syn.config(dataset=ds, policy="full", window=2048), syn.metrics(3.0, 15.0 if ds == "book" else 8.0))
        n += 1
    return root


@pytest.fixture(scope="module")
def pk_dir(tmp_path_factory):
    return write_passkey_sweep(tmp_path_factory.mktemp("pk") / "passkey")


@pytest.fixture(scope="module")
def pk_result(pk_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pk_report")
    return run(Options(paths=[str(pk_dir)], out=out, baseline="policy=full", traces=0)), out


@pytest.fixture(scope="module")
def pk_table(pk_result):
    res, _ = pk_result
    pk, mcols = pkm.labelled(pkm.passkey_runs(res.runs), res.summary.group_cols)
    return pk, pkm.by_config(pk, mcols)


def cfg_row(t: pd.DataFrame, policy: str) -> pd.Series:
    (i,) = t.index[t["policy"] == policy]
    return t.loc[i]


# ------------------------------------------------------------------ pass-key numbers

def test_passkey_summary_keeps_count_and_means(pk_result):
    res, out = pk_result
    t = res.summary.table
    assert len(t) == len(PK_POLICIES) * len(LENGTHS) * len(DEPTHS)  # seeds pooled
    assert (t["count"] == len(SEEDS)).all()
    s = pd.read_csv(out / "summary.csv")
    assert {"count", "answer_acc_mean", "answer_nll_mean", "key_distance_median"} <= set(s.columns)
    r = t[(t["policy"] == "refresh") & (t["dataset.length"] == 256) & (t["dataset.depth"] == 0.1)].iloc[0]
    assert r["answer_acc_mean"] == 0.5 and r["answer_nll_mean"] == pytest.approx(2.55)  # seeds: 1 and 0
    assert r["key_distance_median"] == 230
    assert "answer_acc_mean" in (out / "summary.md").read_text()


def test_passkey_by_config_beyond_the_window(pk_table):
    _, t = pk_table
    n_beyond = sum(len(SEEDS) for L in LENGTHS for d in DEPTHS if key_distance(L, d) > REACH)
    st = cfg_row(t, "streaming")
    assert st["count"] == 18 and st["reach"] == REACH and st["n_beyond"] == n_beyond == 10
    assert st["acc_beyond"] == 0.0 and st["acc_within"] == 1.0 and st["answer_acc_mean"] == pytest.approx(8 / 18)
    rf = cfg_row(t, "refresh")
    assert rf["acc_beyond"] == 0.5 and rf["answer_acc_mean"] == pytest.approx(13 / 18) and rf["retrieves_beyond"]
    # TPOT cost relative to streaming on the same window (no streaming R=8: the smallest R)
    assert rf["streaming_ref"] == st["config"] and rf["tpot_vs_streaming"] == pytest.approx(1.25)
    assert not cfg_row(t, "max_drop")["retrieves_beyond"] and not st["retrieves_beyond"]
    full = cfg_row(t, "full")
    assert math.isnan(full["reach"]) and full["n_beyond"] == 0 and full["answer_acc_mean"] == 1.0
    assert bool(full["beyond_context"]) and not cfg_row(t, "refresh")["beyond_context"]
    # Pareto (min TPOT, max accuracy): max_drop ties streaming on accuracy at a lower TPOT
    assert dict(zip(t["policy"], t["pareto"])) == {"full": True, "max_drop": True, "refresh": True,
                                                    "streaming": False}


def test_streaming_reference_at_the_same_kv_budget():
    """A refresh region carved out of the window (window 908 + region 128) has no streaming run at its own
    window: its reference is the streaming window closest to window + region (1020 of 1020 / 2048)."""
    rows = [("streaming", 1020, 0, 1, 1.0), ("streaming", 2048, 0, 1, 3.0), ("refresh", 908, 128, 32, 1.2),
            ("refresh", 1020, 16, 32, 1.1)]
    pk = pd.DataFrame([{"config": f"{p} w{w} b{b}", "policy": p, "window": w, "policy.refresh_budget": b,
                        "compress_every": R, "n_sink": 4, "model": "m", "answer_acc": 1.0, "answer_nll": 0.1,
                        "key_distance": 2000, "tpot_ms": tp} for p, w, b, R, tp in rows])
    mcols = ["policy", "window", "policy.refresh_budget", "compress_every", "n_sink", "model"]
    t = pkm.by_config(pk, mcols).set_index("config")
    assert t.at["refresh w908 b128", "streaming_ref"] == "streaming w1020 b0"
    assert t.at["refresh w908 b128", "tpot_vs_streaming"] == pytest.approx(1.2)
    assert t.at["refresh w1020 b16", "streaming_ref"] == "streaming w1020 b0"  # the same window wins
    assert t.at["streaming w2048 b0", "streaming_ref"] == ""


def test_passkey_findings_text_from_numbers(pk_table, pk_result):
    _, t = pk_table
    text = " ".join(pkm.findings(t))
    rf, st = cfg_row(t, "refresh"), cfg_row(t, "streaming")
    assert f"**{rf['config']}** (accuracy 0.50 over 10 runs; TPOT 1.25 ms = 1.25x streaming ({st['config']}: 1.00 ms)" in text
    assert text.index("Do not:") < text.index(st["config"] + " (accuracy 0.00")
    # a stricter threshold: nobody retrieves
    strict = pkm.by_config(*pkm.labelled(pkm.passkey_runs(pk_result[0].runs), pk_result[0].summary.group_cols), acc_min=0.6)
    assert "No config retrieves" in " ".join(pkm.findings(strict))
    report = (pk_result[1] / "report.md").read_text()
    assert "## Pass-key retrieval" in report and f"**{rf['config']}**" in report


def test_distance_bins():
    few = pkm.distance_bins(pd.Series([6, 13, 26, 6]))
    assert few["bin_lo"].tolist() == few["bin_hi"].tolist() == [6, 13, 26, 6]
    many = pkm.distance_bins(pd.Series([0, 1, 3, 4, 7, 8, 100, 130, 250, 255, 512]))
    assert many["bin_lo"].tolist() == [0, 1, 2, 4, 4, 8, 64, 128, 128, 128, 512]
    assert many["bin_hi"].tolist() == [1, 2, 4, 8, 8, 16, 128, 256, 256, 256, 1024]


# ------------------------------------------------------------------ pass-key figures

def test_config_labels_leave_out_the_knobs_most_configs_share():
    # refresh_budget=0 / refresh_select=uniform on every policy but refresh: shown only where they differ
    rows = [("streaming", 1, 0, "uniform"), ("streaming", 32, 0, "uniform"), ("snapkv", 32, 0, "uniform"),
            ("refresh", 32, 16, "uniform"), ("refresh", 32, 16, "structural")]
    pk = pd.DataFrame([{"policy": p, "compress_every": r, "policy.refresh_budget": b, "policy.refresh_select": s,
                        "window": 1020} for p, r, b, s in rows])
    cols = ["policy", "policy.refresh_budget", "policy.refresh_select", "window", "compress_every"]
    labels = pkm.labelled(pk, cols)[0]["config"].tolist()
    assert labels == ["streaming R1", "streaming R32", "snapkv R32", "refresh refresh_budget=16 R32",
                      "refresh refresh_budget=16 refresh_select=structural R32"]
    # where leaving a knob out would merge two configs (a missing value is never named), every varying
    # knob is named
    three = pd.DataFrame([{"policy": "refresh", "policy.refresh_budget": b, "window": 1020} for b in (16, 16, None)])
    assert pkm.labelled(three, ["policy", "policy.refresh_budget", "window"])[0]["config"].tolist() == [
        "refresh refresh_budget=16", "refresh refresh_budget=16", "refresh"]


def test_config_labels_each_policy_votes_once_for_the_common_value():
    # refresh swept over more configs than the other policies together: refresh_budget=0 still counts as
    # the common value (it stays out of the other policies' labels), refresh_keep=fifo too
    rows = [("streaming", 1, 0, "uniform", "fifo"), ("snapkv", 32, 0, "uniform", "fifo"),
            ("refresh", 32, 16, "uniform", "fifo"), ("refresh", 32, 16, "structural", "fifo"),
            ("refresh", 32, 16, "attention", "fifo"), ("refresh", 32, 16, "attention", "score")]
    pk = pd.DataFrame([{"policy": p, "compress_every": r, "policy.refresh_budget": b, "policy.refresh_select": s,
                        "policy.refresh_keep": k, "window": 1020} for p, r, b, s, k in rows])
    cols = ["policy", "policy.refresh_budget", "policy.refresh_keep", "policy.refresh_select", "window",
            "compress_every"]
    assert pkm.labelled(pk, cols)[0]["config"].tolist() == [
        "streaming R1", "snapkv R32", "refresh refresh_budget=16 R32",
        "refresh refresh_budget=16 refresh_select=structural R32",
        "refresh refresh_budget=16 refresh_select=attention R32",
        "refresh refresh_budget=16 refresh_keep=score refresh_select=attention R32"]


def test_accuracy_vs_distance_legend_stays_inside_the_figure():
    # labels too long for two columns across the figure go in one column, none cut at the edges
    names = [f"refresh refresh_budget=16 refresh_select=sel{i} cache=static R32 backend_used=cudagraph_fused (online)"
             for i in range(7)] + ["streaming R1", "snapkv R32"]
    bins = pd.DataFrame([{"config": c, "x": x, "answer_acc_mean": 1.0, "count": 3} for c in names for x in (100, 900)])
    t = pd.DataFrame({"config": names, "policy": [c.split()[0] for c in names], "reach": 1024.0})
    fig = pkp.accuracy_vs_distance_plot(bins, t)
    fig.savefig(__import__("io").BytesIO(), format="png")  # lays the figure out as `save` does
    leg = fig.axes[0].get_legend()
    box, page = leg.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    assert len(leg.get_texts()) == len(names)
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, (box, page)
    assert leg._ncols == 1
    plots.plt.close(fig)
    short = pkp.accuracy_vs_distance_plot(bins[bins["config"].str.len() < 20], t)
    assert short.axes[0].get_legend()._ncols == 2  # short labels keep two columns
    plots.plt.close(short)


def test_heatmap_one_panel_per_config_length_by_depth(pk_table):
    pk, t = pk_table
    fig = pkp.heatmap_plot(pk, "dataset.length", list(t["config"]))
    images = {im.get_gid(): im for ax in fig.axes for im in ax.images}
    assert set(images) == {f"heat:{c}" for c in t["config"]}  # one panel per config
    st = images[f"heat:{cfg_row(t, 'streaming')['config']}"].get_array()
    assert st.shape == (len(DEPTHS), len(LENGTHS))
    # rows = depths 0.1, 0.5, 0.9; columns = lengths 64, 128, 256; mean over the two seeds
    expect = [[1.0 if key_distance(L, d) <= REACH else 0.0 for L in LENGTHS] for d in DEPTHS]
    assert np.asarray(st).tolist() == expect
    rf = np.asarray(images[f"heat:{cfg_row(t, 'refresh')['config']}"].get_array())
    assert rf[0].tolist() == [0.5, 0.5, 0.5]
    panel = [ax for ax in fig.axes if ax.images][0]
    assert panel.get_xlabel() == pkp.LENGTH_LABEL and panel.get_ylabel() == pkp.DEPTH_LABEL
    assert [tk.get_text() for tk in panel.get_xticklabels()] == ["64", "128", "256"]
    plots.plt.close(fig)


def test_heatmap_config_with_an_empty_cell(pk_table):
    # A sweep stopped early: one config lacks every run at one length and depth (grey cell, no NaN count).
    pk, t = pk_table
    cfg = cfg_row(t, "refresh")["config"]
    gone = (pk["config"] == cfg) & (pk["dataset.length"].astype(float) == 256) & (pk["dataset.depth"].astype(float) == 0.9)
    assert gone.sum() == len(SEEDS)
    fig = pkp.heatmap_plot(pk[~gone], "dataset.length", list(t["config"]))
    rf = np.asarray(images_of(fig)[f"heat:{cfg}"].get_array(), dtype=float)
    assert np.isnan(rf[2, 2]) and np.isfinite(rf[:2]).all() and np.isfinite(rf[2, :2]).all()
    title = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.images and ax.images[0].get_gid() == f"heat:{cfg}"][0]
    assert title.endswith(f"({len(LENGTHS) * len(DEPTHS) * len(SEEDS) - len(SEEDS)} runs, <= {len(SEEDS)}/cell)")
    plots.plt.close(fig)


def images_of(fig):
    return {im.get_gid(): im for ax in fig.axes for im in ax.images}


def test_accuracy_vs_distance_one_line_per_config(pk_table):
    pk, t = pk_table
    bins = pkm.by_distance(pk)
    n_dist = len({key_distance(L, d) for L in LENGTHS for d in DEPTHS})
    assert (bins.groupby("config")["count"].sum() == 18).all()
    fig = pkp.accuracy_vs_distance_plot(bins, t)
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.lines if (ln.get_gid() or "").startswith("acc:")}
    assert set(lines) == {f"acc:{c}" for c in t["config"]}
    st = lines[f"acc:{cfg_row(t, 'streaming')['config']}"]
    assert len(st.get_xdata()) == n_dist == 9
    assert [y for x, y in zip(st.get_xdata(), st.get_ydata())] == [1.0 if x <= REACH else 0.0 for x in st.get_xdata()]
    reach = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("reach:")]
    assert len(reach) == 3 and all(ln.get_xdata()[0] == REACH for ln in reach)  # the dense run has no window
    assert ax.get_xlabel() == pkp.DIST_LABEL and ax.get_ylabel() == pkp.ACC_LABEL
    plots.plt.close(fig)


def test_passkey_pareto_one_point_per_config(pk_table):
    _, t = pk_table
    fig = pkp.passkey_pareto_plot(t)
    ax = fig.axes[0]
    (pts,) = [c for c in ax.collections if c.get_gid() == "configs"]
    assert len(pts.get_offsets()) == len(t) == 4
    assert sorted(map(tuple, pts.get_offsets().tolist())) == sorted(zip(t["tpot_ms_median"], t["answer_acc_mean"]))
    assert ax.get_xlabel() == "TPOT (ms)" and "accuracy" in ax.get_ylabel()
    assert sorted(txt.get_text() for txt in ax.texts) == sorted(t["config"])
    plots.plt.close(fig)


# ------------------------------------------------------------------ dense baseline, beyond_context

def dense_spec():
    # book 200 tokens: dense 10.0; book 400 tokens: dense 12.0 (beyond the 256-token context); wiki: no dense run
    return [
        (dict(dataset="book", policy="full", window=2048, compress_every=1, max_tokens=200), 10.0, 199),
        (dict(dataset="book", policy="streaming", window=32, compress_every=1, max_tokens=200), 11.0, 40),
        (dict(dataset="book", policy="streaming", window=64, compress_every=1, max_tokens=200), 10.4, 70),
        (dict(dataset="book", policy="streaming", window=64, compress_every=4, max_tokens=200), 10.5, 70),
        (dict(dataset="book", policy="max_drop", window=64, compress_every=4, max_tokens=200, max_drop=8), 10.2, 70),
        (dict(dataset="book", policy="full", window=2048, compress_every=1, max_tokens=400), 12.0, 399),
        (dict(dataset="book", policy="streaming", window=32, compress_every=1, max_tokens=400), 13.2, 40),
        (dict(dataset="wiki", policy="streaming", window=32, compress_every=1, max_tokens=200), 9.0, 40),
        (dict(dataset="wiki", policy="streaming", window=32, compress_every=4, max_tokens=200), 9.9, 40),
    ]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    for n, (kw, ppl, max_pos) in enumerate(dense_spec()):
        syn.write_run(root / str(n), syn.config(**kw), {**syn.metrics(1.0, ppl), "max_position": max_pos,
                                                        "model_context": 256})
    return root


def pick(t, **kw):
    m = pd.Series(True, index=t.index)
    for k, v in kw.items():
        m &= t[k].astype(object).map(lambda x: None if pd.isna(x) else x) == v
    assert m.sum() == 1, kw
    return t[m].iloc[0]


def test_dense_baseline_matches_text_not_window(dense_dir, tmp_path):
    res = run(Options(paths=[str(dense_dir)], out=tmp_path / "r", baseline="policy=full", traces=0))
    t = res.summary.table
    assert res.summary.match == ["model", "dataset", "dataset.max_tokens", "device_name"]  # dataset.path: never set
    # window 32/64 configs take the window-2048 dense run of their own text length
    assert pick(t, policy="streaming", window=32, **{"dataset.max_tokens": 200, "dataset": "book"})["ppl_increase_pct"] == pytest.approx(10.0)
    assert pick(t, policy="streaming", window=64, compress_every=4)["ppl_increase_pct"] == pytest.approx(5.0)
    assert pick(t, policy="max_drop")["ppl_increase_pct"] == pytest.approx(2.0)
    long = pick(t, policy="streaming", **{"dataset.max_tokens": 400})
    assert long["ppl_increase_pct"] == pytest.approx(10.0) and long["baseline_ppl_median"] == 12.0
    assert pick(t, policy="full", **{"dataset.max_tokens": 200})["is_baseline"]
    # the same numbers in the dense column; strict streaming next to it
    assert (t["ppl_increase_vs_dense_pct"].fillna(-1) == t["ppl_increase_pct"].fillna(-1)).all()
    md = pick(t, policy="max_drop")
    assert md["ppl_increase_vs_strict_pct"] == pytest.approx(100 * (10.2 / 10.4 - 1))
    wiki = t[t["dataset"] == "wiki"]
    assert wiki["ppl_increase_pct"].isna().all() and wiki["ppl_increase_vs_strict_pct"].notna().all()
    assert any("no baseline config" in w and "dataset=wiki" in w for w in res.warnings)


def test_dense_column_next_to_strict_baseline(dense_dir, tmp_path):
    res = run(Options(paths=[str(dense_dir)], out=tmp_path / "r", traces=0))  # default: strict streaming
    t = res.summary.table
    md = pick(t, policy="max_drop")
    assert md["ppl_increase_pct"] == pytest.approx(100 * (10.2 / 10.4 - 1))
    assert md["ppl_increase_vs_dense_pct"] == pytest.approx(2.0)
    report = (tmp_path / "r" / "report.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| model") and "| count |" in line)
    assert "ppl_increase_vs_dense_pct" in head and "ppl_increase_vs_strict_pct" not in head  # = ppl_increase_pct
    assert "+2.00" in report


def test_beyond_context_flags_exactly_the_long_dense_run(dense_dir, tmp_path):
    res = run(Options(paths=[str(dense_dir)], out=tmp_path / "r", baseline="policy=full", traces=0))
    runs = res.runs
    flagged = runs[runs["beyond_context"].fillna(False).astype(bool)]
    assert len(flagged) == 1 and flagged.iloc[0]["policy"] == "full" and flagged.iloc[0]["dataset.max_tokens"] == 400
    t = res.summary.table
    assert t["beyond_context"].fillna(False).astype(bool).sum() == 1
    assert pick(t, policy="streaming", **{"dataset.max_tokens": 400})["dense_beyond_context"]
    report = (tmp_path / "r" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "†" in line]
    assert len(rows) == 2  # the dense 400-token run (policy) and the config measured against it (increase)
    assert any("| full †" in r for r in rows) and any("+10.00 †" in r for r in rows)
    assert "beyond the model's context" in report


def test_beyond_context_unknown_without_the_metrics(tmp_path):
    df = pd.DataFrame({"max_position": [10.0, 300.0, np.nan, 256.0], "model_context": [256.0, 256.0, 256.0, 256.0]})
    from analysis.references import beyond_context
    assert beyond_context(df).tolist() == [False, True, pd.NA, True]
    assert beyond_context(pd.DataFrame({"ppl": [1.0]})).isna().all()


def test_old_records_without_new_metrics(tmp_path):
    syn.write_sweep(tmp_path / "old", syn.BOOK)
    res = run(Options(paths=[str(tmp_path / "old")], out=tmp_path / "r", traces=0))
    t = res.summary.table
    assert not any(c.startswith(("tpot_p50", "tpot_p90", "tpot_steady", "answer_")) for c in t.columns)
    assert t["beyond_context"].isna().all() and t["ppl_increase_vs_dense_pct"].isna().all()
    assert not (tmp_path / "r" / "passkey_summary.csv").exists()
    report = (tmp_path / "r" / "report.md").read_text()
    assert "†" not in report and "Pass-key" not in report
    # mixed with new records: the old ones keep NaN timing statistics, the new ones get theirs
    cfg = syn.config(dataset="wiki", compress_every=1)
    syn.write_run(tmp_path / "new" / "0", cfg, {**syn.metrics(2.0, 10.0), **syn.timing(2.0, p50=1.9, p90=3.1, steady=1.8)})
    syn.write_run(tmp_path / "new" / "1", {**cfg, "repeat": 1}, {**syn.metrics(2.2, 10.0), **syn.timing(2.2, p50=2.1, p90=3.3, steady=2.0)})
    res = run(Options(paths=[str(tmp_path / "old"), str(tmp_path / "new")], out=tmp_path / "r2", traces=0))
    t = res.summary.table
    w = pick(t, dataset="wiki")
    assert (w["tpot_p50_ms_median"], w["tpot_p90_ms_median"], w["tpot_steady_ms_median"]) == pytest.approx((2.0, 3.2, 1.9))
    assert t.loc[t["dataset"] == "book", "tpot_p50_ms_median"].isna().all()
    assert "tpot_steady_ms_median" in (tmp_path / "r2" / "summary.md").read_text()


# ------------------------------------------------------------------ regime map, legible Pareto plots

def test_regime_map(tmp_path):
    write_regime_sweep(tmp_path / "reg")
    res = run(Options(paths=[str(tmp_path / "reg")], out=tmp_path / "r", traces=0))
    t = res.summary.table
    assert plots.has_regimes(t) and (tmp_path / "r" / "plots" / "regime_map.png").is_file()
    fig = plots.regime_plot(t, ["model", "dataset"], ["policy.max_drop"])
    axes = [a for a in fig.axes if a.get_xlabel()]
    assert len(axes) == 4  # datasets book/wiki x windows 32/64
    for ax in axes:
        assert ax.get_xlabel() == "R / W (compress_every / window)" and ax.get_ylabel() == "PPL (median)"
        lines = {ln.get_gid(): ln for ln in ax.lines if (ln.get_gid() or "").startswith("regime:")}
        assert set(lines) == {"regime:streaming", "regime:max_drop"}
        ds = "book" if "book" in ax.get_title() else "wiki"
        w = 32 if "window 32" in ax.get_title() else 64
        st = lines["regime:streaming"]
        assert list(st.get_xdata()) == pytest.approx([1 / w, 1 / 16, 1 / 4, 1.0])
        assert list(st.get_ydata()) == pytest.approx([regime_ppl(ds, "streaming", w, r) for r in (1, w // 16, w // 4, w)])
        (dense,) = [ln for ln in ax.lines if ln.get_gid() == "dense"]
        assert dense.get_ydata()[0] == (15.0 if ds == "book" else 8.0)
    plots.plt.close(fig)


def test_regime_map_leaves_out_other_sweeps(tmp_path):
    """A report over a regime sweep and another sweep (one window, a few R, another model) draws only the
    regime sweep's panels and legend entries."""
    write_regime_sweep(tmp_path / "reg")
    other = tmp_path / "other"
    other.mkdir()
    for n, (pol, r) in enumerate([("streaming", 1), ("streaming", 4), ("h2o", 4)]):
        syn.write_run(other / str(n), syn.config(model="other_model", dataset="wiki", policy=pol, window=2048,
                                                 compress_every=r), {**syn.metrics(1.0, 9.0 + n), **syn.timing(1.0)})
    res = run(Options(paths=[str(tmp_path / "reg"), str(other)], out=tmp_path / "r", traces=0))
    fig = plots.regime_plot(res.summary.table, ["model", "dataset"], [])
    axes = [a for a in fig.axes if a.get_xlabel()]
    assert len(axes) == 4 and not any("other_model" in a.get_title() or "2048" in a.get_title() for a in axes)
    labels = {lab for a in fig.axes for lab in a.get_legend_handles_labels()[1]}
    assert "h2o" not in labels and {"streaming", "max_drop"} <= labels
    plots.plt.close(fig)


def cluster_table(n_fast=20):
    pol = ["streaming", "refresh", "overlap", "max_drop"]
    rows = [{"model": "m", "policy": pol[i % 4], "cache": "ring", "backend": "graph", "compress_every": 2 ** (i % 6),
             "policy.overlap": i, "tpot_ms_median": 0.96 + 0.001 * (i % 5),
             "ppl_increase_pct": 0.01 * (i % 7) - 0.02} for i in range(n_fast)]
    rows += [{"model": "m", "policy": "h2o", "cache": "ring", "backend": "graph", "compress_every": 1,
              "policy.overlap": 0, "tpot_ms_median": x, "ppl_increase_pct": y} for x, y in ((2.3, 150.0), (3.3, 2.0), (4.9, 0.5))]
    t = pd.DataFrame(rows)
    t["is_baseline"] = t.index == 0
    t["pareto"] = False
    t.loc[[0, 5], "pareto"] = True
    return t


def _overlaps(texts, renderer):
    boxes = [t.get_window_extent(renderer) for t in texts]
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


def test_pareto_zoom_panel_numbers_and_no_label_collisions():
    t = cluster_table()
    fig = plots.pareto_plot(t, "crowded", ["compress_every", "policy.overlap"])
    main_ax, zoom_ax = fig.axes[0], fig.axes[1]
    assert plots.configs_in(fig) == len(t)  # the zoom repeats points but does not count them twice
    (zpts,) = [c for c in zoom_ax.collections if c.get_gid() == "configs_zoom"]
    assert len(zpts.get_offsets()) == 20 and zoom_ax.get_xlim()[1] < 1.0
    assert [c.get_gid() for c in main_ax.patches if c.get_gid() == "zoom_area"] == ["zoom_area"]
    nums = sorted(int(x.get_text()) for x in zoom_ax.texts)
    assert nums == list(range(1, 21))
    key = plots.zoom_key(t, ["compress_every", "policy.overlap"])
    assert key["#"].tolist() == list(range(1, 21)) and key["tpot_ms_median"].is_monotonic_increasing
    renderer = fig.canvas.get_renderer()
    assert _overlaps(zoom_ax.texts, renderer) == []
    assert zoom_ax.get_xlabel() == "TPOT (ms)"
    plots.plt.close(fig)
    # few clustered configs: their own labels instead of numbers, still without collisions
    fig = plots.pareto_plot(cluster_table(8), "crowded", ["compress_every", "policy.overlap"])
    zoom_ax = fig.axes[1]
    assert all(not x.get_text().isdigit() for x in zoom_ax.texts) and len(zoom_ax.texts) == 8
    assert _overlaps(zoom_ax.texts, fig.canvas.get_renderer()) == []
    plots.plt.close(fig)


def test_label_placement_is_disjoint_and_deterministic():
    from analysis.labels import place

    pts = [(100.0, 100.0)] * 12 + [(104.0, 101.0), (300.0, 50.0)]
    sizes = [(60.0, 10.0)] * len(pts)
    boxes = place(sizes, pts, (0, 0, 800, 600))
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (i, j)
    assert place(sizes, pts, (0, 0, 800, 600)) == boxes


# ------------------------------------------------------------------ the acceptance command

def test_cli_passkey_and_regime_with_dense_baseline(pk_dir, tmp_path):
    reg = write_regime_sweep(tmp_path / "regime")
    out = tmp_path / "R"
    assert main([str(pk_dir), str(reg), "--baseline", "policy=full", "--out", str(out), "--traces", "0"]) == 0
    for f in ("passkey_heatmap", "passkey_accuracy_vs_distance", "passkey_pareto", "regime_map", "pareto_book"):
        assert (out / "plots" / f"{f}.png").stat().st_size > 1000, f
    s = pd.read_csv(out / "summary.csv")
    assert "answer_acc_mean" in s and s.loc[s["dataset"] == "passkey", "answer_acc_mean"].notna().all()
    assert not (out / "plots" / "pareto_passkey.png").exists()
    by_dist = pd.read_csv(out / "passkey_by_distance.csv")
    assert set(by_dist.columns) >= {"config", "bin_lo", "bin_hi", "count", "answer_acc_mean"}
    report = (out / "report.md").read_text()
    assert "plots/passkey_heatmap.png" in report and "plots/regime_map.png" in report
    assert "| passkey |" not in report.split("## Summary")[0]  # no PPL verdict or recommendation on filler text
    # regime configs: PPL increase vs the window-2048 dense run of their dataset
    st = s[(s["dataset"] == "book") & (s["policy"] == "streaming") & (s["window"] == 32) & (s["compress_every"] == 1)]
    assert st["ppl_increase_pct"].iloc[0] == pytest.approx(100 * (regime_ppl("book", "streaming", 32, 1) / 15.0 - 1))
