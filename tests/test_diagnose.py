"""Phase-A diagnostics: spike statistics on hand-made NLL traces, the metrics keys, and the
`python -m streamkv.diagnose` command on real run directories."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import PYTHON, ROOT, compose

from streamkv import spikes as SP


def test_spike_table_against_a_reference():
    n = 40
    nll = np.full(n, 2.0)
    ref = np.full(n, 2.0)
    nll[11:14] += [3.0, 1.5, 0.5]  # after the prune at step 10 (first row after it: 11)
    nll[31] += 2.0  # after the prune at step 30
    t = SP.spike_table(nll, np.arange(1, n + 1), [10, 30, 45], k=4, reference=ref, threshold=1.0)
    assert t["step"].tolist() == [10, 30]  # 45: past the end of the text
    assert t["rows"].tolist() == [4, 4]
    np.testing.assert_allclose(t["peak"], [3.0, 2.0])
    assert t["width"].tolist() == [2, 1]  # excess > 1.0 nat: 3.0 and 1.5; then 2.0
    np.testing.assert_allclose(t["area"], [5.0, 2.0])
    m = SP.spike_metrics(nll, np.arange(1, n + 1), [{"step": 10}, {"step": 30}], k=4, reference=ref)
    assert m["spike_n"] == 2 and m["spike_k"] == 4
    assert m["spike_peak_mean"] == pytest.approx(2.5) and m["spike_peak_max"] == pytest.approx(3.0)
    assert m["spike_area_mean"] == pytest.approx(3.5) and m["spike_width_max"] == 2


def test_spike_table_without_reference_uses_the_mean_before_the_prune():
    nll = np.concatenate([np.full(20, 1.0), [4.0, 1.0, 1.0]])
    t = SP.spike_table(nll, np.arange(1, 24), [19], k=3, baseline_window=8)
    assert t["baseline"].tolist() == [1.0]
    np.testing.assert_allclose(t["peak"], [3.0])
    np.testing.assert_allclose(t["area"], [3.0])
    assert SP.spike_metrics(nll, np.arange(1, 24), [], k=3)["spike_n"] == 0


def test_ages_and_excess_by_age_separate_spike_from_drift():
    # prunes every 5 steps; the first step after each prune is 1 nat worse than the reference
    n = 60
    steps = np.arange(9, n, 5)
    index = np.arange(1, n + 1)
    ages = SP.token_ages(index, steps)
    assert ages[:10].tolist() == [-1] * 10  # rows before the first prune (inputs 0..9)
    assert ages[10:16].tolist() == [1, 2, 3, 4, 5, 1]
    nll = np.where(ages == 1, 3.0, 2.0)
    by = SP.excess_by(nll, index, steps, ages, reference=np.full(n, 2.0))
    assert by["key"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(by["excess_mean"], [1.0, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Two real run records on the same text: lazy (R=16) and the strict-streaming reference."""
    from streamkv.runner import run_job

    root = tmp_path_factory.mktemp("diag")
    dirs = {}
    for name, r in (("lazy", 16), ("ref", 1)):
        d = root / name
        d.mkdir()
        cfg = compose("model=tiny_llama", "dataset.max_tokens=300", "window=48", f"compress_every={r}",
                      "progress=false")
        payload = run_job(cfg, d)
        assert payload["status"] == "ok"
        dirs[name] = d
    return dirs


def test_run_record_has_spike_metrics(run_dirs):
    m = json.loads((run_dirs["lazy"] / "result.json").read_text())["metrics"]
    for key in ("spike_peak_mean", "spike_peak_max", "spike_width_mean", "spike_width_max", "spike_area_mean",
                "spike_area_max", "spike_k", "spike_n", "refreshed_total"):
        assert isinstance(m[key], (int, float)), key
    assert m["spike_n"] == m["n_prunes"] - 1 or m["spike_n"] == m["n_prunes"]


def test_diagnose_command_draws_and_prints(run_dirs, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "streamkv.diagnose", str(run_dirs["lazy"]), "--ref", str(run_dirs["ref"]),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "140"})
    assert proc.returncode == 0, proc.stderr
    for f in ("nll.png", "nll.svg", "spikes.csv", "by_age.csv", "by_visible.csv"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "nll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "nll.svg").read_text()[:2000]
    text = proc.stdout
    assert "spikes after prunes" in text and "reference run (same token)" in text
    assert "tokens since the last prune" in text and "visible KV length" in text
    assert "boundary spike" in text and "window drift" in text
    import pandas as pd

    spikes = pd.read_csv(out / "spikes.csv")
    assert list(spikes.columns) == ["step", "rows", "peak", "width", "area", "baseline"]
    events = pd.read_parquet(run_dirs["lazy"] / "events.parquet")
    assert set(spikes["step"]) <= set(events["step"]) and len(spikes) >= len(events) - 1
    by_age = pd.read_csv(out / "by_age.csv")
    assert by_age["age"].min() == 1 and by_age["age"].max() <= 16


def test_diagnose_without_reference_and_errors(run_dirs, tmp_path, capsys):
    from streamkv.diagnose import main

    assert main([str(run_dirs["lazy"]), "--out", str(tmp_path / "a"), "--k", "8"]) == 0
    assert (tmp_path / "a" / "nll.png").is_file()
    assert "spikes after prunes" in capsys.readouterr().out
    # a reference on another text (shorter) is refused with one line, exit 2
    other = tmp_path / "short"
    other.mkdir()
    import pandas as pd

    pd.read_parquet(run_dirs["ref"] / "tokens.parquet").head(50).to_parquet(other / "tokens.parquet")
    assert main([str(run_dirs["lazy"]), "--ref", str(other), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the same text" in err[0]
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
