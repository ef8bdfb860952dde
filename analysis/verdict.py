"""Recommended configs per scenario and the go/no-go verdict, each with the numbers it rests on.

All comparisons are within one scope (model, dataset, device by default) of the summary table, and a
config is compared with the best plain lazy prune on its own decode path (`backend_used`, else
`backend`): a faster backend must not pass for a better eviction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .passkey import PASSKEY
from .select import norm, norm_series
from .summarize import Summary, config_label, varying

BOOK = ("book", "pg19")
WIKI = ("wiki", "wikitext")


@dataclass
class Finding:
    scope: dict[str, str]            # e.g. {"model": "m", "dataset": "book", "device_name": "H100"}
    kind: str                        # "short text" | "long text" | "verdict (book protocol)" | ...
    outcome: str                     # a config label, "GO", "NO-GO", or "undecided"
    reason: str                      # one sentence with the numbers
    numbers: dict[str, float] = field(default_factory=dict)


def protocol(dataset: str) -> str | None:
    """`book` for book/pg19, `wiki` for wiki/wikitext (and their variants, e.g. wikitext103)."""
    d = str(dataset).lower()
    if d in BOOK or d.startswith("pg19"):
        return "book"
    if d in WIKI or d.startswith("wikitext"):
        return "wiki"
    return None


def _f(v: float, unit: str = "", nd: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{nd}f}{unit}"


def _scopes(s: Summary):
    t = s.table
    if t.empty:
        return
    keys = s.pareto_by
    if not keys:
        yield {}, t
        return
    gid = pd.DataFrame({k: norm_series(t[k]) for k in keys}).apply(tuple, axis=1)
    for key in sorted(set(gid)):
        yield dict(zip(keys, key)), t[gid == key]


def _label_cols(s: Summary) -> list[str]:
    # Name configs by the columns that actually vary, minus the scope they are reported under.
    return [c for c in varying(s.table, s.group_cols) if c not in s.pareto_by] or ["policy"]


def _best_lazy(g: pd.DataFrame) -> pd.Series | None:
    lazy = g[g["lazy_prune"] & g["tpot_ms_median"].notna()]
    if lazy.empty:
        return None
    return lazy.sort_values("tpot_ms_median", kind="mergesort").iloc[0]


def _path(g: pd.DataFrame) -> pd.Series:
    """The decode path of each config: backend_used where recorded, else the backend asked for."""
    for col in ("backend_used", "backend"):
        if col in g and g[col].notna().any():
            return norm_series(g[col])
    return pd.Series("", index=g.index, dtype=object)


def _lazy_ref(g: pd.DataFrame) -> tuple[pd.Series, dict]:
    """(each config's path, path -> the fastest plain lazy prune on that path)."""
    path = _path(g)
    refs = {}
    for p in sorted(set(path)):
        best = _best_lazy(g[path == p])
        if best is not None:
            refs[p] = best
    return path, refs


def _below_lazy(g: pd.DataFrame, path: pd.Series, refs: dict) -> pd.Series:
    """True where a config is faster than the best lazy prune on its own path."""
    ref_tpot = path.map(lambda p: refs[p].tpot_ms_median if p in refs else float("nan")).astype(float)
    return g["tpot_ms_median"] < ref_tpot


def _lazy_label(lazy: pd.Series, cols: list[str]) -> str:
    return (f"best lazy prune on the same decode path {config_label(lazy, cols)}: TPOT "
            f"{_f(lazy.tpot_ms_median, ' ms')}, PPL increase {_f(lazy.ppl_increase_pct, ' %')}")


def recommend(s: Summary, short_ppl_max: float = 3.0) -> list[Finding]:
    """Short text: fastest config with PPL increase <= short_ppl_max.
    Long text: lowest PPL increase among configs faster (lower TPOT) than the best plain lazy prune on
    their decode path."""
    out: list[Finding] = []
    cols = _label_cols(s)
    for scope, g in _scopes(s):
        if scope.get("dataset") == PASSKEY:
            continue  # a pass-key text's PPL is over filler: the pass-key section judges those runs
        g = g[g["ppl_increase_pct"].notna() & g["tpot_ms_median"].notna()]
        ok = g[g["ppl_increase_pct"] <= short_ppl_max].sort_values(
            ["tpot_ms_median", "ppl_increase_pct"], kind="mergesort")
        if ok.empty:
            out.append(Finding(scope, "short text", "none",
                               f"no config with a PPL increase <= {short_ppl_max:g} %"))
        else:
            r = ok.iloc[0]
            out.append(Finding(scope, "short text", config_label(r, cols),
                               f"fastest with PPL increase <= {short_ppl_max:g} %: TPOT {_f(r.tpot_ms_median, ' ms')}, "
                               f"PPL increase {_f(r.ppl_increase_pct, ' %')}, speedup {_f(r.tpot_speedup, 'x', 3)}",
                               {"tpot_ms": r.tpot_ms_median, "ppl_increase_pct": r.ppl_increase_pct}))
        path, refs = _lazy_ref(g)
        if not refs:
            out.append(Finding(scope, "long text", "none", "no plain lazy-prune config to compare against"))
            continue
        fast = g[_below_lazy(g, path, refs)].sort_values(["ppl_increase_pct", "tpot_ms_median"], kind="mergesort")
        if fast.empty:
            lazy = _best_lazy(g)
            out.append(Finding(scope, "long text", "none", f"no config faster than the best lazy prune on its "
                               f"decode path (the fastest lazy prune: {config_label(lazy, cols)}, TPOT "
                               f"{_f(lazy.tpot_ms_median, ' ms')})",
                               {"lazy_tpot_ms": lazy.tpot_ms_median}))
        else:
            r = fast.iloc[0]
            lazy = refs[path[r.name]]
            ref = _lazy_label(lazy, cols)
            out.append(Finding(scope, "long text", config_label(r, cols),
                               f"lowest PPL increase below the lazy-prune TPOT: PPL increase "
                               f"{_f(r.ppl_increase_pct, ' %')}, TPOT {_f(r.tpot_ms_median, ' ms')} (vs the {ref})",
                               {"tpot_ms": r.tpot_ms_median, "ppl_increase_pct": r.ppl_increase_pct,
                                "lazy_tpot_ms": lazy.tpot_ms_median}))
    return out


def verdicts(s: Summary, book_ppl_max: float = 5.0, wiki_ppl_max: float = 3.0) -> list[Finding]:
    """GO when some candidate config (neither the baseline nor a plain lazy prune) has a PPL increase
    <= the protocol's limit and a TPOT strictly below the best plain lazy prune's on its decode path
    (candidates on a path without a lazy prune are not judged)."""
    out: list[Finding] = []
    cols = _label_cols(s)
    for scope, g in _scopes(s):
        proto = protocol(scope.get("dataset", norm(g["dataset"].iloc[0]) if "dataset" in g else ""))
        if proto is None:
            continue
        limit = book_ppl_max if proto == "book" else wiki_ppl_max
        kind = f"verdict ({proto} protocol)"
        rule = f"PPL increase <= {limit:g} % and TPOT below the best lazy prune on the same decode path"
        path, refs = _lazy_ref(g)
        cand = g[~g["is_baseline"] & ~g["lazy_prune"] & g["ppl_increase_pct"].notna() & g["tpot_ms_median"].notna()]
        cand = cand[path[cand.index].isin(list(refs))]  # a candidate needs a lazy prune on its own path
        if not refs or cand.empty or not g["is_baseline"].any():
            what = ("no plain lazy-prune config" if not refs else
                    "no baseline config" if not g["is_baseline"].any() else
                    "no candidate config with a PPL increase on a decode path that has a lazy prune")
            out.append(Finding(scope, kind, "undecided", f"{rule}: {what}"))
            continue
        passing = cand[(cand["ppl_increase_pct"] <= limit) & _below_lazy(cand, path[cand.index], refs)]
        if not passing.empty:
            r = passing.sort_values(["tpot_ms_median", "ppl_increase_pct"], kind="mergesort").iloc[0]
            verdict = "GO"
            why = "passes"
        else:
            # Show the closest miss: the lowest PPL increase among candidates, then the fastest.
            r = cand.sort_values(["ppl_increase_pct", "tpot_ms_median"], kind="mergesort").iloc[0]
            verdict = "NO-GO"
            why = "closest candidate fails"
        lazy = refs[path[r.name]]
        ref = _lazy_label(lazy, cols)
        nums = {"limit_pct": limit, "lazy_tpot_ms": lazy.tpot_ms_median, "lazy_ppl_increase_pct": lazy.ppl_increase_pct,
                "tpot_ms": r.tpot_ms_median, "ppl_increase_pct": r.ppl_increase_pct}
        out.append(Finding(scope, kind, verdict,
                           f"{rule}; {why}: {config_label(r, cols)} has PPL increase {_f(r.ppl_increase_pct, ' %')}, "
                           f"TPOT {_f(r.tpot_ms_median, ' ms')} (vs the {ref})", nums))
    return out
