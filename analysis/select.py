"""`key=value` specs (--where, --baseline, --lazy-prune) and matching them against table rows.

Values are compared as normalised text so `compress_every=4` matches 4, 4.0 and "4" alike.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import pandas as pd

from .collect import AnalysisError

NA = "<NA>"  # the normalised form of a missing value; `key=<NA>` selects rows without the key


def norm(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return NA
    if isinstance(v, bool) or str(type(v)) == "<class 'numpy.bool_'>":
        return str(bool(v)).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if hasattr(v, "item"):  # numpy scalars
        return norm(v.item())
    s = str(v)
    return s.lower() if s in ("True", "False") else s


def norm_series(s: pd.Series) -> pd.Series:
    return s.astype("object").map(norm)


def parse_spec(spec: str, what: str) -> dict[str, str]:
    """`a=1,b=x` -> {"a": "1", "b": "x"}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise AnalysisError(f"{what}: '{part}' is not key=value (in '{spec}')")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    if not out:
        raise AnalysisError(f"{what}: empty spec")
    return out


def parse_where(clause: str) -> tuple[str, bool, set[str]]:
    """`key=v1,v2` (any of) or `key!=v` -> (key, negate, values)."""
    if "!=" in clause:
        k, v = clause.split("!=", 1)
        neg = True
    elif "=" in clause:
        k, v = clause.split("=", 1)
        neg = False
    else:
        raise AnalysisError(f"--where: '{clause}' is not key=value or key!=value")
    vals = {x.strip() for x in v.split(",")}
    return k.strip(), neg, vals


def check_columns(df: pd.DataFrame, keys: Iterable[str], what: str) -> None:
    for k in keys:
        if k not in df.columns:
            near = difflib.get_close_matches(k, [str(c) for c in df.columns], n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise AnalysisError(f"{what}: unknown column '{k}'{hint}")


def apply_where(df: pd.DataFrame, clauses: Iterable[str]) -> pd.DataFrame:
    for clause in clauses:
        k, neg, vals = parse_where(clause)
        check_columns(df, [k], "--where")
        hit = norm_series(df[k]).isin(vals)
        df = df[~hit if neg else hit]
    return df.reset_index(drop=True)


def matches(df: pd.DataFrame, spec: dict[str, str]) -> pd.Series:
    """Boolean mask of rows equal to every key=value of `spec` (a missing column never matches)."""
    mask = pd.Series(True, index=df.index)
    for k, v in spec.items():
        if k not in df.columns:
            return pd.Series(False, index=df.index)
        mask &= norm_series(df[k]) == v
    return mask
