"""The command line as users type it: bad configs fail fast with one line; multiruns write one
complete record per combination; failures are recorded and sweeps resume (local launcher)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from streamkv.record import iter_results

TINY_SWEEP = ["-m", "model=tiny_llama", "compress_every=1,4", "window=16,32", "dataset.max_tokens=200",
              "device=cpu", "progress=false"]

BAD = [
    (["model=tiny_llama", "window=0"], "window: must be >= 1"),
    (["model=tiny_llama", "n_sink=-1"], "n_sink: must be >= 0"),
    (["model=tiny_llama", "compress_every=0"], "compress_every: must be >= 1"),
    (["policy=no_such_policy"], "policy: unknown option 'no_such_policy'"),
    (["cache=no_such_cache"], "cache: unknown option"),
    (["model=tiny_llama", "dtype=float64"], "dtype: 'float64' is not one of"),
    (["model=tiny_llama", "device=tpu"], "device: 'tpu' is not one of"),
    (["model=hf"], "model.name_or_path: required"),
    (["dataset=text_file"], "dataset.path: required"),
    (["model=tiny_llama", "dataset.max_tokens=100", "prefill_tokens=100"], "prefill_tokens: must be <"),
    (["model=tiny_llama", "policy.no_such_knob=1"], "policy.no_such_knob"),
    (["model=tiny_llama", "policy=tova", "policy.positions=bogus"],
     "policy.positions: 'bogus' is not one of original, shift"),
    (["model=tiny_llama", "window=abc"], "window"),
    (["model=tiny_llama", "window=16,32"], "needs -m/--multirun"),
    (["-m", "model=tiny_llama", "window=16,0"], "window: must be >= 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_fails_fast_with_one_line(args, message, tmp_path):
    start = time.time()
    proc = run_cli(*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep", timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # nothing ran
    assert time.time() - start < 30


def test_text_shorter_than_prefill_is_a_failed_run(tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("tiny")
    proc = run_cli("model=tiny_llama", "dataset=text_file", f"dataset.path={src}", "prefill_tokens=10",
                   "device=cpu", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed" and "prefill_tokens" in rec["error"]["message"]


def _records(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]


def test_multirun_writes_one_complete_record_per_combination(tmp_path):
    proc = run_cli(*TINY_SWEEP, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    recs = _records(tmp_path)
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    combos = {(r["config"]["compress_every"], r["config"]["window"]) for r in recs}
    assert combos == {(1, 16), (1, 32), (4, 16), (4, 32)}
    for run_dir in sorted(p.parent for p in tmp_path.glob("*/result.json")):
        for name in ("tokens.parquet", "events.parquet", ".hydra/config.yaml", "run.log"):
            assert (run_dir / name).is_file(), name
        tokens = pd.read_parquet(run_dir / "tokens.parquet")  # no prefill here: every token is decoded
        assert list(tokens.columns) == ["index", "token_id", "nll", "visible_kv", "entropy", "step_ms"]
        assert tokens["step_ms"].notna().all() and (tokens["step_ms"] >= 0).all()
    assert "4 ok, 0 failed, 0 skipped" in proc.stderr


def test_failures_are_recorded_and_the_sweep_resumes(tmp_path):
    sweep = [*TINY_SWEEP, f"hydra.sweep.dir={tmp_path}"]
    proc = run_cli(*sweep, env={"STREAMKV_FAULT": "1:raise"})
    assert proc.returncode == 1
    assert "3 ok, 1 failed, 0 skipped" in proc.stderr
    failed = json.loads((tmp_path / "1" / "result.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["type"] == "RuntimeError"
    assert "Traceback" in (tmp_path / "1" / "run.log").read_text()  # the traceback goes to the log

    proc = run_cli(*sweep)  # same command, no fault: only the failed run runs
    assert proc.returncode == 0, proc.stderr
    assert "1 ok, 0 failed, 3 skipped as complete" in proc.stderr
    assert all(r["status"] == "ok" for r in _records(tmp_path))

    proc = run_cli(*sweep, "rerun=true")
    assert proc.returncode == 0 and "4 ok, 0 failed, 0 skipped" in proc.stderr


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    sweep = [*TINY_SWEEP, f"hydra.sweep.dir={tmp_path}"]
    proc = run_cli(*sweep, env={"STREAMKV_FAULT": "2:kill"})
    assert proc.returncode != 0  # the local launcher's process died with job 2
    assert [r["status"] for r in _records(tmp_path)] == ["ok", "ok"]
    mtimes = {p: p.stat().st_mtime for p in tmp_path.glob("*/result.json")}
    proc = run_cli(*sweep)
    assert proc.returncode == 0, proc.stderr
    assert "2 ok, 0 failed, 2 skipped as complete" in proc.stderr
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())  # finished runs untouched


def test_a_changed_matrix_resumes_without_overwriting_other_configs(tmp_path):
    # Hydra numbers run dirs by job: with a value put in front, job 0 is a new config and job 1 is the
    # config that ran as job 0 before. The old record moves aside (still found), nothing runs twice.
    base = ["-m", "model=tiny_llama", "window=16", "dataset.max_tokens=120", "device=cpu", "progress=false",
            f"hydra.sweep.dir={tmp_path}"]
    proc = run_cli(*base, "compress_every=1,4")
    assert proc.returncode == 0 and "2 ok, 0 failed, 0 skipped" in proc.stderr, proc.stderr
    before = {r["config"]["compress_every"]: r["identity"] for r in _records(tmp_path)}
    proc = run_cli(*base, "compress_every=2,1,4")
    assert proc.returncode == 0, proc.stderr
    assert "1 ok, 0 failed, 2 skipped as complete" in proc.stderr
    recs = {r["config"]["compress_every"]: r for _, r in iter_results(tmp_path)}
    assert sorted(recs) == [1, 2, 4] and all(r["status"] == "ok" for r in recs.values())
    assert {R: recs[R]["identity"] for R in (1, 4)} == before
    moved = tmp_path / "displaced" / before[1]
    assert (moved / "result.json").is_file() and (moved / "tokens.parquet").is_file()
    assert json.loads((tmp_path / "0" / "result.json").read_text())["config"]["compress_every"] == 2


def test_default_sweep_dir_is_stable_per_command():
    from streamkv.cli import default_sweep_dir

    a = default_sweep_dir(["-m", "window=16,32", "compress_every=1,4"])
    assert a == default_sweep_dir(["compress_every=1,4", "-m", "window=16,32"])
    assert a != default_sweep_dir(["-m", "window=16,64", "compress_every=1,4"])
    assert a.startswith("multirun/")
