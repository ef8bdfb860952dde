"""Per-step host timings of finished runs, to tell a slow *run* from slow *steps* (the eager paths'
bimodal TPOT, docs/results/README.md finding 7): for each run dir, the step_ms quantiles, and the
median over consecutive blocks of steps (a mode switch inside a run shows as a jump between blocks).

    python scripts/step_modes.py RUN_DIR... [--block 256] [--out modes.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from streamkv.diagnose import DiagnoseError, load_run


def step_modes(run_dir: Path, block: int) -> dict:
    try:
        run = load_run(run_dir)  # the run record's reader (tokens.parquet + result.json)
    except DiagnoseError as exc:
        raise SystemExit(str(exc))
    tokens = run["tokens"]
    if "step_ms" not in tokens:
        raise SystemExit(f"{run_dir}: tokens.parquet has no step_ms column (a record made before the column existed)")
    ms = tokens["step_ms"].to_numpy(np.float64)
    ms = ms[np.isfinite(ms)]
    blocks = [float(np.median(ms[i:i + block])) for i in range(0, len(ms), block)]
    q = np.percentile(ms, [10, 50, 90, 99])
    return {"run": str(run_dir), "tpot_ms": run["result"]["metrics"]["tpot_ms"], "steps": int(len(ms)),
            "p10": q[0], "p50": q[1], "p90": q[2], "p99": q[3], "block_medians": blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--block", type=int, default=256, help="steps per block median (default 256)")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = [step_modes(d, args.block) for d in args.runs]
    for r in rows:
        print(f"{r['run']}: tpot {r['tpot_ms']:.2f} ms, steps {r['steps']}, p10/p50/p90/p99 "
              f"{r['p10']:.2f}/{r['p50']:.2f}/{r['p90']:.2f}/{r['p99']:.2f} ms; per {args.block} steps: "
              + " ".join(f"{b:.1f}" for b in r["block_medians"]))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
