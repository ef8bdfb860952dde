"""CLI: `python -m analysis <sweep or run dirs...> --out report/` (console script `streamkv-analysis`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .collect import AnalysisError
from .pipeline import Options, run
from .references import DENSE_MATCH
from .summarize import DEFAULT_BASELINE, DEFAULT_IGNORE, DEFAULT_MATCH, DEFAULT_PARETO_BY


def _cols(s: str) -> list[str]:
    return [c.strip() for c in s.split(",") if c.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamkv-analysis",
        description="Tables, plots and a report from streamkv run records (see docs/analysis.md).")
    p.add_argument("paths", nargs="+", help="sweep or run directories, searched recursively for runs")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory (default: report)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=V[,V..]|KEY!=V",
                   help="keep only matching runs; repeatable (all must hold), e.g. --where dataset=book")
    p.add_argument("--group-by", type=_cols, default=None, metavar="COLS",
                   help="comma-separated columns defining a config (default: every config column except "
                        f"{','.join(DEFAULT_IGNORE)}, plus device_name)")
    p.add_argument("--ignore", type=_cols, default=list(DEFAULT_IGNORE), metavar="COLS",
                   help=f"config columns left out of the default grouping (default: {','.join(DEFAULT_IGNORE)})")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, metavar="K=V,..",
                   help=f"the baseline config (default: {DEFAULT_BASELINE})")
    p.add_argument("--match", type=_cols, default=None, metavar="COLS",
                   help=f"columns a config shares with its baseline; `group.*` = every column of the group "
                        f"(default: {','.join(DEFAULT_MATCH)}; with --baseline policy=full: "
                        f"{','.join(DENSE_MATCH)}, i.e. not window or compress_every)")
    p.add_argument("--pareto-by", type=_cols, default=list(DEFAULT_PARETO_BY), metavar="COLS",
                   help=f"scope of Pareto sets, recommendations and verdicts (default: {','.join(DEFAULT_PARETO_BY)})")
    p.add_argument("--lazy-prune", dest="lazy", default="policy=streaming", metavar="K=V,..",
                   help="plain lazy prune = these values and compress_every > 1 (default: policy=streaming)")
    p.add_argument("--short-ppl-max", type=float, default=3.0, metavar="PCT",
                   help="short-text recommendation: max PPL increase in %% (default: 3)")
    p.add_argument("--long-ppl-max", type=float, default=5.0, metavar="PCT",
                   help="book-protocol verdict: max PPL increase in %% (default: 5)")
    p.add_argument("--wiki-ppl-max", type=float, default=3.0, metavar="PCT",
                   help="wiki-protocol verdict: max PPL increase in %% (default: 3)")
    p.add_argument("--passkey-acc-min", type=float, default=0.5, metavar="ACC",
                   help="pass-key: a config retrieves keys older than its window when it answers at least this "
                        "share of them (default: 0.5)")
    p.add_argument("--traces", type=int, default=4, metavar="N",
                   help="NLL/visible-KV traces of N runs picked automatically (baseline, Pareto, best lazy "
                        "prune per scope; default 4; 0 = none)")
    p.add_argument("--trace-runs", nargs="+", default=[], metavar="RUN_DIR",
                   help="trace exactly these run directories instead")
    p.add_argument("--rolling", type=int, default=64, metavar="TOKENS",
                   help="rolling-mean window of the NLL traces (default: 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    opts = Options(paths=a.paths, out=a.out, where=a.where, group_by=a.group_by, ignore=a.ignore,
                   baseline=a.baseline, match=a.match, pareto_by=a.pareto_by, lazy=a.lazy,
                   short_ppl_max=a.short_ppl_max, long_ppl_max=a.long_ppl_max, wiki_ppl_max=a.wiki_ppl_max,
                   passkey_acc_min=a.passkey_acc_min, traces=a.traces, trace_runs=a.trace_runs, rolling=a.rolling)
    try:
        res = run(opts)
    except AnalysisError as e:
        print(f"streamkv-analysis: error: {e}", file=sys.stderr)
        return 2
    n = res.runs["status"].value_counts()
    print(f"{len(res.runs)} runs ({', '.join(f'{v} {k}' for k, v in sorted(n.items()))}), "
          f"{len(res.summary.table)} configs -> {opts.out}/report.md")
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
