"""The single-node SLURM test cluster (slurm/local-cluster.sh) and the Hydra launchers on it.

Runs only while that cluster is up (`bash slurm/local-cluster.sh up`); otherwise every test here
is skipped with the reason.  It submits to partition "local" only, so it never runs against a
real site's cluster by accident (a login node without that partition skips too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("STREAMKV_SLURM_STATE", "/tmp/streamkv-slurm"))
PARTITION = os.environ.get("STREAMKV_SLURM_PARTITION", "local")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    conf = STATE / "etc" / "slurm.conf"
    if "SLURM_CONF" not in env and conf.exists():
        env["SLURM_CONF"] = str(conf)
    return env


ENV = _env()


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _cluster_skip_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM not installed (no sinfo); start the test cluster: bash slurm/local-cluster.sh up"
    if ENV.get("SLURM_CONF") == str(STATE / "etc" / "slurm.conf") and not _pid_alive(STATE / "run" / "slurmctld.pid"):
        # fast path: sinfo would retry the dead controller for ~10 s
        return f"the test cluster in {STATE} is down; start it: bash slurm/local-cluster.sh up"
    try:
        p = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%t"], env=ENV, capture_output=True,
                           text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out; is slurmctld up? (bash slurm/local-cluster.sh up)"
    if p.returncode != 0:
        return f"sinfo failed ({p.stderr.strip()[:200]}); start the cluster: bash slurm/local-cluster.sh up"
    states = p.stdout.split()
    if not states:
        return f"no partition {PARTITION!r}: not the streamkv test cluster (bash slurm/local-cluster.sh up)"
    if not any(s in ("idle", "mix", "alloc") for s in states):
        return f"partition {PARTITION!r} has no usable node (states: {' '.join(states)})"
    return None


_REASON = _cluster_skip_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=ENV, capture_output=True, text=True, timeout=60, check=True, **kw)


def sbatch(tmp_path: Path, script: str, *opts: str) -> str:
    p = _run("sbatch", "--parsable", f"--partition={PARTITION}", f"--chdir={tmp_path}",
             f"--output={tmp_path}/%j.out", "--time=5", "--mem=100M", *opts, "--wrap", script)
    return p.stdout.strip().split(";")[0]


def wait_states(job_id: str, n_tasks: int = 0, timeout: float = 180) -> dict[str, str]:
    """Poll sacct until job_id (or all n_tasks tasks of array job_id) is in a terminal state;
    returns {jobid: state}.  Array tasks reach the database with some lag, hence n_tasks."""
    want = {f"{job_id}_{i}" for i in range(n_tasks)} if n_tasks else {job_id}
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = _run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State").stdout
        states = {}
        for line in out.splitlines():
            jid, _, state = line.partition("|")
            states[jid] = state.split()[0] if state else ""  # "CANCELLED by 0" -> CANCELLED
        if want <= states.keys() and all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {states}")


def test_config_limits():
    cfg = _run("scontrol", "show", "config").stdout
    values = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in cfg.splitlines()) if v}
    assert values["MaxArraySize"] == "1001"
    assert values["AccountingStorageType"] == "accounting_storage/slurmdbd"


def test_trivial_job_completes(tmp_path):
    jid = sbatch(tmp_path, "echo hello from $SLURM_JOB_ID; id -u")
    assert wait_states(jid) == {jid: "COMPLETED"}
    out = (tmp_path / f"{jid}.out").read_text().split()
    assert out[:3] == ["hello", "from", jid] and out[3] == "0"  # ran as root


@pytest.mark.parametrize("gpu_opt", ["--gres=gpu:1", "--gpus=1"])
def test_gpu_job_completes(tmp_path, gpu_opt):
    jid = sbatch(tmp_path, 'echo "CVD=$CUDA_VISIBLE_DEVICES"', gpu_opt)
    assert wait_states(jid) == {jid: "COMPLETED"}
    assert (tmp_path / f"{jid}.out").read_text().strip() == "CVD=0"
    tres = _run("sacct", "-X", "-n", "-P", "-j", jid, "-o", "AllocTRES").stdout
    assert "gres/gpu=1" in tres


def test_failed_job_is_reported(tmp_path):
    # submitit learns of crashed jobs from sacct; a non-zero exit must show as FAILED there.
    jid = sbatch(tmp_path, "exit 3")
    assert wait_states(jid) == {jid: "FAILED"}
    assert _run("sacct", "-X", "-n", "-P", "-j", jid, "-o", "ExitCode").stdout.strip() == "3:0"


def test_array_job(tmp_path):
    jid = sbatch(tmp_path, "echo $SLURM_ARRAY_TASK_ID", "--array=0-2%2",
                 f"--output={tmp_path}/%A_%a.out")
    assert wait_states(jid, n_tasks=3) == {f"{jid}_{i}": "COMPLETED" for i in range(3)}
    # one past MaxArraySize-1 is refused at submission
    with pytest.raises(subprocess.CalledProcessError) as err:
        sbatch(tmp_path, "true", "--array=1001")
    assert "array" in err.value.stderr.lower()


SWEEP = ["-m", "hydra/launcher=slurm_local", "model=tiny_llama", "compress_every=1,4", "window=16,32",
         "dataset.max_tokens=200", "device=cpu", "progress=false"]


def run_py(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _array_job_id(sweep: Path) -> str:
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
    assert len(ids) == 1, ids
    return ids.pop()


def test_sweep_survives_crashes_and_resumes(tmp_path):
    """4 runs as one array job: one raises, one is killed hard; the others finish; the summary says
    so; the same command then runs only the two failed ones; a third time it launches nothing."""
    sweep = tmp_path / "sweep"
    p = run_py(*SWEEP, f"hydra.sweep.dir={sweep}", env={"STREAMKV_FAULT": "1:raise,2:kill"})
    assert p.returncode == 1, p.stderr[-3000:]
    assert "2 ok, 1 failed, 0 skipped as complete, 1 crashed" in p.stderr
    states = wait_states(_array_job_id(sweep), n_tasks=4)
    assert sorted(states.values()) == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"]  # the kill
    assert json.loads((sweep / "1" / "result.json").read_text())["status"] == "failed"
    assert not (sweep / "2" / "result.json").exists()

    p = run_py(*SWEEP, f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 ok, 0 failed, 2 skipped as complete" in p.stderr
    recs = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(4)]
    assert [r["status"] for r in recs] == ["ok"] * 4
    assert {(r["config"]["compress_every"], r["config"]["window"]) for r in recs} == {(1, 16), (1, 32), (4, 16), (4, 32)}

    p = run_py(*SWEEP, f"hydra.sweep.dir={sweep}", timeout=60)
    assert p.returncode == 0 and "0 ok, 0 failed, 4 skipped as complete" in p.stderr
    assert "Submitit" not in p.stderr  # nothing was submitted


def test_preempted_job_is_requeued_and_finishes(tmp_path):
    """SLURM's pre-timeout/preemption signal (USR2) makes submitit checkpoint and requeue the job;
    the requeued attempt finishes with a complete record."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=slurm_local", "model=tiny_llama", "window=16",
           "dataset.max_tokens=200", "device=cpu", "progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "STREAMKV_FAULT": "0:sleep120"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        job = None
        while time.monotonic() < deadline:  # wait until the job runs (sleeping in its first attempt)
            out = _run("squeue", "-h", "-o", "%A %T").stdout.split()
            if len(out) >= 2 and out[1] == "RUNNING" and (sweep / "0" / ".hydra").exists():
                job = out[0]
                break
            time.sleep(1)
        assert job, "the job never started"
        _run("scancel", "--signal=USR2", job)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # requeued jobs wait ~2 min (BeginTime): start it now
            st = _run("squeue", "-h", "-j", job, "-o", "%T %r").stdout.strip()
            if st.startswith("PENDING"):
                _run("scontrol", "update", f"JobId={job}", "StartTime=now")
                break
            time.sleep(1)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "ok"
    history = _run("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State").stdout.split()
    assert "REQUEUED" in history or "PREEMPTED" in history, history
