#!/usr/bin/env python
"""streamkv entry point: compose (Hydra) -> validate -> run -> record.

    python run.py                                   # the default job (conf/config.yaml)
    python run.py -m policy=streaming compress_every=1,32,64 window=1024,2048
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from streamkv.cli import fail, precheck, print_summary
from streamkv.config import ConfigError, register_configs
from streamkv.record import utc_now

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> str:
    from streamkv.runner import record_failure, run_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    started = utc_now()
    try:
        payload = run_job(cfg, run_dir)
    except ConfigError as exc:  # caught by the precheck normally; a text too short lands here
        record_failure(cfg, run_dir, exc, started)
        print(f"error: {exc}", file=sys.stderr)
        status = "failed"
    except Exception as exc:  # the sweep goes on; the record says what happened
        import logging
        logging.getLogger("streamkv").exception("run failed")
        payload = record_failure(cfg, run_dir, exc, started)
        print(f"run failed: {payload['error']['type']}: {payload['error']['message']} (record: {run_dir})",
              file=sys.stderr)
        status = "failed"
    else:
        print_summary(payload, run_dir)
        status = "ok"
    if hc.mode.name == "RUN" and status != "ok":
        sys.exit(1)
    return status


if __name__ == "__main__":
    try:
        precheck(sys.argv[1:])
    except ConfigError as exc:
        fail(str(exc))
    main()
