"""Rewrite the absolute paths in run records to relative ones, so records can be committed.

Hydra writes the sweep dir, each run's output dir and the checkout it ran from as absolute paths
(`.hydra/hydra.yaml`, `multirun.yaml`), and a skipped job's `job-status.json` names the finished run
it found. After this script, a path inside a sweep dir is relative to that run's sweep dir (`0`,
`fast/3`, `.`) and a path inside the checkout is relative to the checkout (`.`, `conf`).

    python scripts/relativize_records.py docs/results/records/*      # in place; prints what it changed
    python scripts/relativize_records.py --check docs/results/records/*   # exit 1 if any file would change

Only text files (.yaml, .json, .log, .txt) are touched. Anything absolute that is neither inside a
sweep dir nor inside the checkout is reported and left as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

TEXT = {".yaml", ".json", ".log", ".txt"}
SWEEP_DIR = re.compile(r"^  sweep:\n    dir: (/\S+)$", re.M)  # hydra.sweep.dir in hydra.yaml / multirun.yaml
CWD = re.compile(r"^    cwd: (/\S+)$", re.M)  # hydra.runtime.cwd
MACHINE = re.compile(r"(?<![\w.:/])/(?:root|home|work|tmp|scratch)/[^\s\"',)\]]*")


def _hydra_file(path: Path, top: Path) -> Path | None:
    """The Hydra config that says where this file's run (or sweep) lived."""
    for d in [path.parent, *path.parents]:
        for name in (".hydra/hydra.yaml", "multirun.yaml"):
            if (d / name).is_file():
                return d / name
        if d == top:
            return None
    return None


def _roots(text: str) -> tuple[str | None, str | None]:
    sweep, cwd = SWEEP_DIR.search(text), CWD.search(text)
    return (sweep.group(1) if sweep else None), (cwd.group(1) if cwd else None)


def relativize(text: str, sweep: str | None, cwd: str | None, all_sweeps: list[str]) -> tuple[str, list[str]]:
    """(new text, absolute paths left as they were)."""
    left = []

    def sub(m: re.Match) -> str:
        p = m.group(0).rstrip("/")
        for root in sorted(all_sweeps, key=len, reverse=True):
            if sweep and (p == root or p.startswith(root + "/")):
                return os.path.relpath(p, sweep)
        if cwd and (p == cwd or p.startswith(cwd + "/")):
            return os.path.relpath(p, cwd)
        left.append(p)
        return m.group(0)

    return MACHINE.sub(sub, text), left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = ap.parse_args(argv)
    changed, leftovers = 0, set()
    for top in args.dirs:
        files = [p for p in sorted(top.rglob("*")) if p.is_file() and p.suffix in TEXT]
        hydra = {f: _hydra_file(f, top) for f in files}
        roots = {h: _roots(h.read_text()) for h in set(hydra.values()) if h is not None}
        all_sweeps = sorted({s for s, _ in roots.values() if s})
        for f in files:
            sweep, cwd = roots.get(hydra[f], (None, None))
            old = f.read_text()
            new, left = relativize(old, sweep, cwd, all_sweeps)
            leftovers.update(f"{f}: {p}" for p in left)
            if new != old:
                changed += 1
                if not args.check:
                    f.write_text(new)
    for line in sorted(leftovers):
        print(f"left absolute: {line}", file=sys.stderr)
    verb = "would change" if args.check else "changed"
    print(f"{changed} files {verb}", file=sys.stderr)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
