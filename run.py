#!/usr/bin/env python
"""streamkv entry point: compose (Hydra) -> validate -> run -> record.

    python run.py                                   # the default job (conf/config.yaml)
    python run.py -m policy=streaming compress_every=1,32,64 window=1024,2048

Every job of a sweep is checked before anything runs (one line per mistake). A multirun writes
into multirun/<overrides>-<hash>/ unless hydra.sweep.dir is given, so re-running the same
command resumes it: runs with an ok record are skipped (rerun=true forces them).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from streamkv import sweep
from streamkv.cli import default_sweep_dir, fail, precheck, print_summary
from streamkv.errors import ConfigError
from streamkv.policies import register_configs
from streamkv.record import run_identity, utc_now
from streamkv.runner import plain_config, record_failure, run_job

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> str:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    started = utc_now()
    if multirun:
        identity = run_identity(plain_config(cfg))
        done = None if cfg.rerun else sweep.find_finished(Path(hc.sweep.dir), identity)
        if done is not None:
            # relative to the sweep dir: records are committed, an absolute path would name this machine
            sweep.write_job_status(run_dir, "skipped", os.path.relpath(done, hc.sweep.dir))
            return "skipped"
        sweep.displace_foreign_record(run_dir, Path(hc.sweep.dir), identity)
    try:
        sweep.inject_fault(hc.job.get("num") if multirun else None)
        payload = run_job(cfg, run_dir)
    except Exception as exc:  # the sweep goes on; the record says what happened
        if not isinstance(exc, ConfigError):
            logging.getLogger("streamkv").info("run failed", exc_info=True)  # traceback: run.log only
        payload = record_failure(cfg, run_dir, exc, started)
        print(f"run failed: {payload['error']['type']}: {payload['error']['message']} (record: {run_dir})",
              file=sys.stderr)
        status = "failed"
    else:
        print_summary(payload, run_dir, compact=multirun)
        status = "ok"
    sweep.write_job_status(run_dir, status)
    if not multirun and status != "ok":
        sys.exit(1)
    return status


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        identities = precheck(args)
    except ConfigError as exc:
        fail(str(exc))
    os.environ.setdefault(sweep.INVOCATION_ENV, sweep.new_invocation())
    os.environ[sweep.EXPECTED_JOBS_ENV] = str(len(identities))
    if any(a in ("-m", "--multirun") for a in args):
        sweep_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")), None)
        if sweep_dir is None:
            sweep_dir = default_sweep_dir(args)
            sys.argv.append(f"hydra.sweep.dir={sweep_dir}")
        # nothing left to do: say so without launching anything (no SLURM jobs for finished runs)
        done = sweep.finished_runs(Path(sweep_dir))
        if all(i in done for i in identities):
            print(f"sweep {sweep_dir}: 0 ok, 0 failed, {len(identities)} skipped as complete", file=sys.stderr)
            sys.exit(0)
    main()
