"""Small composable pieces of the lazy-streaming core (streamkv.policies.lazy): which tokens of an
evicted segment to refresh, which stay in the refresh region, which token strings are "structural",
and the entropy-driven slack.

All host-side numpy; nothing here touches K/V.
"""

from __future__ import annotations

import numpy as np

REFRESH_SELECTS = ("uniform", "structural", "entropy", "attention")
REFRESH_KEEPS = ("fifo", "score")
ADAPTIVE_MODES = ("slack", "entropy")

# Structural classes, best first. Decided from a token's decoded string, never from ids.
NEWLINE, SENTENCE_END, QUOTE, OTHER = 3, 2, 1, 0
SENTENCE_END_CHARS = ".!?;:。！？"
QUOTE_CHARS = "\"'`“”‘’«»„"


def spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (the middle of k equal parts), ascending and distinct."""
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return ((np.arange(k) * 2 + 1) * n // (2 * k)).astype(np.int64)


def token_class(text: str) -> int:
    """NEWLINE if the token contains a line break; SENTENCE_END if it ends (ignoring trailing
    spaces/quotes) with sentence punctuation; QUOTE if it contains a quote mark; else OTHER."""
    if "\n" in text or "\r" in text:
        return NEWLINE
    core = text.rstrip().rstrip(QUOTE_CHARS + ")]")
    if core and core[-1] in SENTENCE_END_CHARS:
        return SENTENCE_END
    if any(c in QUOTE_CHARS for c in text):
        return QUOTE
    return OTHER


class TokenClasses:
    """Structural class of each token id, decoded lazily with the tokenizer (only ids that occur)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, int] = {}

    def text(self, token_id: int) -> str:
        tok = self.tokenizer
        try:
            return tok.decode([token_id])
        except Exception:  # a tokenizer without decode of single ids
            return tok.convert_ids_to_tokens([token_id])[0]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.int64)
        for j, i in enumerate(np.asarray(ids).tolist()):
            c = self._memo.get(i)
            if c is None:
                c = self._memo[i] = token_class(self.text(i))
            out[j] = c
        return out


def pick_by_priority(priority: np.ndarray, k: int) -> np.ndarray:
    """k positions of `priority` (ascending result): highest priority first; among equal priority,
    spread evenly over the segment (so ties never bunch at one end)."""
    n = len(priority)
    k = min(k, n)
    chosen: list[np.ndarray] = []
    left = k
    for level in sorted(set(priority.tolist()), reverse=True):
        if left <= 0:
            break
        idx = np.flatnonzero(priority == level)
        take = idx if len(idx) <= left else idx[spread(len(idx), left)]
        chosen.append(take)
        left -= len(take)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def top_by_score(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the k highest scores; ties: the earlier (older) index first, as keep_top."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:max(0, k)]).astype(np.int64)


def select_refresh(how: str, k: int, seg_pos: np.ndarray, *, entropy=None, token_ids=None,
                   classes: TokenClasses | None = None, scores=None) -> np.ndarray:
    """Positions (indices into `seg_pos`, ascending) of the <= k tokens of an evicted segment that move
    into the refresh region. seg_pos: text positions of the segment.

    uniform: evenly spread over the segment.
    structural: newline > sentence end > quote tokens (spread within a class), the rest filled
      evenly from the remaining tokens.
    entropy: the tokens whose own step (the step whose input the token was) had the highest
      predictive entropy; ties broken toward the more recent token.
    attention: the k highest SnapKV scores (`scores`, one per segment token: the attention of the last
      obs_window queries, pooled along the keys, mean over heads, summed over layers); ties: the older.
    """
    n = len(seg_pos)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if how == "uniform":
        return spread(n, k)
    if how == "structural":
        return pick_by_priority(classes(token_ids[seg_pos]), k)
    if how == "entropy":
        ent = np.asarray(entropy, dtype=np.float64)
        order = np.lexsort((-np.arange(n), -ent))  # highest entropy first, then the most recent
        return np.sort(order[:k])
    if how == "attention":
        return top_by_score(scores, k)
    raise ValueError(f"refresh_select: unknown '{how}'")


def refresh_region(keep: str, region: np.ndarray, budget: int, scores=None) -> np.ndarray:
    """Which of the candidate refresh tokens stay (indices into `region`, ascending): `region` = the
    region's tokens then the newly refreshed ones, in cache order (slots).

    fifo: the newest `budget` (the oldest leave first).
    score: the `budget` best by `scores` (one per candidate: the same prune's SnapKV scores, so the
      region's tokens compete with the new ones under the same queries); ties: the older.
    """
    if len(region) <= budget:
        return np.arange(len(region), dtype=np.int64)
    if keep == "fifo":
        return np.arange(len(region) - budget, len(region), dtype=np.int64)
    if keep == "score":
        return top_by_score(scores, budget)
    raise ValueError(f"refresh_keep: unknown '{keep}'")


def entropy_slack(recent_entropy: float, extra_slack: int, low: float, high: float) -> int:
    """Allowed slack over n_sink + window for the current recent entropy: the full extra_slack at or
    below `low`, 0 at or above `high`, linear (floored) in between."""
    if recent_entropy <= low:
        return extra_slack
    if recent_entropy >= high:
        return 0
    return int(extra_slack * (high - recent_entropy) / (high - low))
