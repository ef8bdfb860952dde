"""End to end: a tiny-model multirun with run.py, then the analysis on its sweep directory.

Kept apart from test_analysis.py (fast, synthetic records) because the four CPU runs take ~30 s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / "run.py").is_file(), reason="run.py not written yet")
def test_end_to_end_tiny_multirun(tmp_path):
    pytest.importorskip("torch")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "model=tiny_llama", "compress_every=1,4", "window=16,32",
           "dataset.max_tokens=200", "device=cpu", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    s = pd.read_csv(out / "summary.csv")
    assert len(s) == 4 and (s["count"] == 1).all()
    assert sorted(zip(s["window"], s["compress_every"])) == [(16, 1), (16, 4), (32, 1), (32, 4)]
    assert s.loc[s["compress_every"] == 1, "ppl_increase_pct"].eq(0).all()
    assert s["ppl_increase_pct"].notna().all() and s["tpot_speedup"].notna().all()
    runs = pd.read_parquet(out / "runs.parquet")
    assert (runs["status"] == "ok").all() and runs["device_name"].notna().all()
    for f in ("report.md", "report.html", "plots/pareto_wiki.png", "plots/nll_traces.png"):
        assert (out / f).stat().st_size > 0, f
