"""streamkv analysis: run records -> tables, plots and a report. Reads files only (no torch; of streamkv only
its run-record reader, streamkv.record).

Entry point: `python -m analysis <dirs...> --out report/` (see docs/analysis.md).
"""

from .collect import AnalysisError, collect, find_run_dirs
from .pipeline import Options, Result, run
from .summarize import summarize

__all__ = ["AnalysisError", "collect", "find_run_dirs", "Options", "Result", "run", "summarize"]
