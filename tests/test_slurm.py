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


def _cluster_skip_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM not installed (no sinfo); start the test cluster: bash slurm/local-cluster.sh up"
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


@pytest.mark.skipif(not (ROOT / "run.py").exists(), reason="run.py not present")
def test_hydra_sweep_on_slurm_local(tmp_path):
    """python run.py -m hydra/launcher=slurm_local: one array task per run, records in the sweep dir."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=slurm_local", "model=tiny_llama",
           "window=16,32", "dataset.max_tokens=200", "device=cpu", "progress=false",
           f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for i in range(2):
        rec = json.loads((sweep / str(i) / "result.json").read_text())
        assert rec["status"] == "ok", rec.get("error")
    job_dirs = [d.name for d in (sweep / ".submitit").iterdir() if d.is_dir() and "_" in d.name]
    array_id = job_dirs[0].split("_")[0]
    assert wait_states(array_id, n_tasks=2, timeout=60) == {f"{array_id}_{i}": "COMPLETED" for i in range(2)}
