"""PPL over the first N tokens of runs whose per-token traces (tokens.parquet) exist: compares a long run
with a dense (policy=full) run on the same text cut to N tokens, which the analysis cannot match (their
texts differ in length). Writes one CSV row per run.

    python scripts/prefix_ppl.py --tokens 8000 --dense RUN_DIR --out prefix.csv RUN_DIR...

The NLL of token i predicts token i + 1, so N tokens give N - 1 predictions; the dense run must cover
exactly those (its text is the same text cut to N tokens). Runs without traces are reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from streamkv.record import read_result  # noqa: E402


def prefix_ppl(run_dir: Path, n_tokens: int) -> float | None:
    """exp(mean NLL) over the first n_tokens - 1 predictions of the run's trace; None without a trace."""
    path = Path(run_dir) / "tokens.parquet"
    if not path.is_file():
        return None
    nll = pd.read_parquet(path, columns=["nll"])["nll"].to_numpy()
    if len(nll) < n_tokens - 1:
        raise ValueError(f"{run_dir}: {len(nll)} predictions, fewer than the {n_tokens - 1} asked for")
    return float(np.exp(nll[: n_tokens - 1].mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, required=True, help="N: tokens of the prefix")
    ap.add_argument("--dense", type=Path, required=True, help="the dense run over exactly N tokens")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    dense = prefix_ppl(args.dense, args.tokens)
    if dense is None:
        ap.error(f"{args.dense}: no tokens.parquet")
    rows = []
    for run in args.runs:
        rec = read_result(run)
        ppl = prefix_ppl(run, args.tokens)
        if rec is None or ppl is None:
            print(f"skipped {run}: no result.json or no tokens.parquet", file=sys.stderr)
            continue
        c = rec["config"]
        rows.append({"run": str(run), "policy": c["policy"]["name"], "n_sink": c["n_sink"], "window": c["window"],
                     "compress_every": c["compress_every"], "repeat": c["repeat"], "ppl_full_text": rec["metrics"]["ppl"],
                     f"ppl_first_{args.tokens}": ppl, "dense_ppl": dense,
                     "ppl_increase_vs_dense_pct": 100.0 * (ppl / dense - 1.0)})
    pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.6g", lineterminator="\n")
    print(f"{len(rows)} runs -> {args.out} (dense PPL over the first {args.tokens} tokens: {dense:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
