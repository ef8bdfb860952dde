"""hydra-submitit-launcher's SLURM launcher, tolerant of jobs that die.

The stock launcher collects results with `[j.results()[0] for j in jobs]`: the first job that was
killed (SIGKILL, OOM killer, node failure) raises there, the rest of the sweep is never collected
and Hydra reports only that one failure. Here a dead job is logged and counted as "crashed"; the
sweep summary (streamkv.sweep.SweepSummary) reports it and the command exits non-zero.
Preemption/timeout: the stock `checkpoint` requeues the job (max_num_timeout in the launcher config).
"""

from __future__ import annotations

import sys

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from submitit.core.core import Job


class TolerantSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        original = Job.results

        def results(job):
            try:
                return original(job)
            except Exception as exc:  # noqa: BLE001 - any submitit failure here means the job died
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(f"job {job.job_id} died: {type(exc).__name__}: {first}", file=sys.stderr)
                return [JobReturn(overrides=[], status=JobStatus.COMPLETED, _return_value="crashed")]

        Job.results = results  # scoped to this launch: restored below
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            Job.results = original
