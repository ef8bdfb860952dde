"""Sweeps that survive failures and resume.

- Skip: a job whose identity (streamkv.record.run_identity of the resolved config) already has an
  ok record anywhere under the sweep directory is not run again (`rerun=true` forces).
- Displace: Hydra names a run dir by job number, so when a sweep's matrix changes (a preset gains a
  block) job N of the resumed sweep can be another config than the record already in dir N; that record
  moves to `displaced/<its identity>` under the sweep dir (still found by identity) instead of being
  overwritten.
- Status: every job invocation leaves `job-status.json` in its run dir, tagged with the
  invocation id of the command that launched it; the summary counts them at the end.
- Summary: the `SweepSummary` Hydra callback prints ok / failed / skipped / crashed after a
  multirun and exits non-zero if anything failed or never reported (a killed process).
- `hydra_plugins.streamkv_launcher.tolerant_slurm.TolerantSlurmLauncher`: hydra-submitit-launcher stops collecting at
  the first job that died (killed, OOM-killed by SLURM); that subclass keeps collecting.
- Fault injection for tests: $STREAMKV_FAULT = "JOBNUM:raise,JOBNUM:kill,JOBNUM:sleep20" (outside
  the config, so a re-run without it has the same identities).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from streamkv.record import iter_results, read_result

INVOCATION_ENV = "STREAMKV_INVOCATION"
EXPECTED_JOBS_ENV = "STREAMKV_EXPECTED_JOBS"
FAULT_ENV = "STREAMKV_FAULT"
STATUS_FILE = "job-status.json"


def new_invocation() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def finished_runs(sweep_dir: Path) -> dict[str, Path]:
    """identity -> run dir, for every ok record under sweep_dir."""
    found: dict[str, Path] = {}
    for run_dir, rec in iter_results(sweep_dir):
        if rec.get("status") == "ok" and rec.get("identity"):
            found.setdefault(rec["identity"], run_dir)
    return found


def find_finished(sweep_dir: Path, identity: str) -> Path | None:
    """A run dir under sweep_dir holding an ok record of this identity, or None."""
    return finished_runs(sweep_dir).get(identity)


RECORD_FILES = ("result.json", "tokens.parquet", "events.parquet", STATUS_FILE)


def displace_foreign_record(run_dir: Path, sweep_dir: Path, identity: str) -> Path | None:
    """Move the record in run_dir to sweep_dir/displaced/<its identity> when it is another run's than
    `identity` (module docstring); returns where it went, or None when there was nothing to move. run.log
    is copied, not moved: Hydra has already opened it for this job."""
    rec = read_result(run_dir)
    if rec is None or rec.get("identity") == identity:
        return None
    base = Path(sweep_dir) / "displaced" / str(rec.get("identity") or "unknown")
    dest, n = base, 1
    while dest.exists():  # the same record displaced before: keep both
        dest, n = base.with_name(f"{base.name}.{n}"), n + 1
    dest.mkdir(parents=True)
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            os.replace(run_dir / name, dest / name)
    if (run_dir / "run.log").is_file():
        shutil.copy2(run_dir / "run.log", dest / "run.log")
    return dest


def write_job_status(run_dir: Path, status: str, detail: str = "") -> None:
    payload = {"invocation": os.environ.get(INVOCATION_ENV), "status": status, "detail": detail}
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, run_dir / STATUS_FILE)


def inject_fault(job_num: int | None) -> None:
    """Test hook: make job `job_num` raise or die hard, as named in $STREAMKV_FAULT."""
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        num, _, kind = item.partition(":")
        if job_num is not None and int(num) == job_num:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind.startswith("sleep"):  # a slow first attempt, to be signalled (preemption tests)
                if not int(os.environ.get("SLURM_RESTART_COUNT") or 0):
                    time.sleep(float(kind[5:] or 30))
                continue
            raise RuntimeError(f"fault injected by ${FAULT_ENV} into job {job_num}")


def collect_statuses(sweep_dir: Path, invocation: str | None) -> dict[str, list[str]]:
    """Job dirs of this invocation by status; a job dir without a status of this invocation that
    Hydra created (it has .hydra/) counts as crashed."""
    out: dict[str, list[str]] = {"ok": [], "failed": [], "skipped": [], "crashed": []}
    for hydra_dir in sorted(sweep_dir.glob("**/.hydra")):
        run_dir = hydra_dir.parent
        try:
            st = json.loads((run_dir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            st = None
        if st is None or (invocation and st.get("invocation") != invocation):
            # untouched by this invocation: either a crash now, or a dir from an older command
            if hydra_dir.stat().st_mtime >= _invocation_start(invocation):
                out["crashed"].append(str(run_dir))
            continue
        out.setdefault(st["status"], []).append(str(run_dir))
    return out


def _invocation_start(invocation: str | None) -> float:
    if not invocation:
        return 0.0
    try:
        return time.mktime(time.strptime(invocation.split("-")[0], "%Y%m%dT%H%M%S")) - 1
    except ValueError:
        return 0.0


def print_sweep_summary(sweep_dir: Path, invocation: str | None, expected: int | None) -> int:
    """Print the summary; return the exit code (1 if any run failed, crashed or is missing)."""
    st = collect_statuses(sweep_dir, invocation)
    counted = sum(len(v) for v in st.values())
    missing = max(0, (expected or counted) - counted)
    parts = [f"{len(st['ok'])} ok", f"{len(st['failed'])} failed", f"{len(st['skipped'])} skipped as complete"]
    if st["crashed"]:
        parts.append(f"{len(st['crashed'])} crashed")
    if missing:
        parts.append(f"{missing} missing")
    print(f"sweep {sweep_dir}: " + ", ".join(parts), file=sys.stderr)
    for status in ("failed", "crashed"):
        for run_dir in st[status]:
            rec = read_result(Path(run_dir)) or {}
            err = rec.get("error") or {}
            why = f"{err.get('type')}: {err.get('message')}" if err else "no record (the process died)"
            print(f"  {status}: {run_dir}  {why}", file=sys.stderr)
    return 1 if (st["failed"] or st["crashed"] or missing) else 0


class SweepSummary(Callback):
    """Prints ok / failed / skipped at the end of a multirun; non-zero exit if any run failed."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        expected = os.environ.get(EXPECTED_JOBS_ENV)
        code = print_sweep_summary(Path(str(config.hydra.sweep.dir)), os.environ.get(INVOCATION_ENV),
                                   int(expected) if expected else None)
        if code:
            sys.exit(code)
