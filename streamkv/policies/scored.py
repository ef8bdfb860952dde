"""Score-based baselines (snapkv, h2o, tova): shared plumbing.

They read attention weights through `decoder.attention_observer(layer, q_rot, k_rot, mask)`, computed
here as an explicit softmax(q K^T * scale) of the step's query rows against the cached keys (a
[H, T, L] product per layer: cheap at decode, no eager full attention). The cache managers evict the
same slots in every layer and head, so each baseline reduces its scores to one number per cached
token (mean over heads and layers).

Budget: like `streaming`, a prune fires when the cache exceeds n_sink + window + compress_every - 1
and brings it back to exactly n_sink + window (R = 1: every step, the classic per-step setting).
The n_sink first tokens are always kept (sinks), like every policy here.

Positions (`policy.positions`, the instance's position_mode): "original" (the default) — a kept token
keeps its text position (gaps stay), as kvpress does; "shift" — StreamingLLM's positions (the kept
tokens get contiguous positions in cache order, the query the next one), to compare the *selection*
with streaming's like for like (with original positions the query passes the model's trained
context on long texts). The scores are computed the same way in both modes (softmax(q K^T) of the
keys as the cache manager rotates them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from streamkv.config import PolicyConfig
from streamkv.errors import ConfigError
from streamkv.policies.base import Decision, Policy, check_knobs

POSITIONS = ("original", "shift")


@dataclass
class ScoredConfig(PolicyConfig):
    """The knob every score-based baseline takes."""

    # RoPE positions of the kept tokens: original (each keeps its text position, as kvpress) | shift
    # (StreamingLLM: contiguous positions in cache order); null = the policy's own, original
    positions: Optional[str] = None


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) per query head: q [1, H, T, D], k [1, Hkv, L, D] -> [Hkv, G, T, L]
    (float32; G = H / Hkv query heads per KV head). mask: None, bool [T, L] (True = attend), or
    additive float."""
    _, H, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qg = q[0].float().reshape(Hkv, H // Hkv, T, D)
    s = torch.matmul(qg, k[0].float().transpose(-1, -2)[:, None]) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return s.softmax(-1)


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] (already rotated at some positions) by delta[T] more positions (RoPE
    composes; delta may be negative): angles in float64 from inv_freq, no attention scaling (a pure
    rotation of the first 2 * len(inv_freq) dims; the rest, if any, unchanged)."""
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    r = emb.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    out = rot * cos + torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], dim=-1) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def keep_top(scores: np.ndarray, length: int, n_sink: int, n_recent: int, budget: int) -> np.ndarray:
    """Slots to keep (ascending): the sinks, the n_recent newest, and the highest-scoring others up to
    `budget` in all (ties: the older token first). scores[i] belongs to slot i."""
    S = min(n_sink, length)
    recent = max(0, min(n_recent, length - S))
    middle = np.arange(S, length - recent)
    n_top = max(0, min(budget - S - recent, len(middle)))
    order = np.argsort(-np.asarray(scores, dtype=np.float64)[middle], kind="stable")
    top = middle[order[:n_top]]
    return np.sort(np.concatenate([np.arange(S), top, np.arange(length - recent, length)])).astype(np.int64)


class ScoredPolicy(Policy):
    """Base of the attention-score baselines. Subclasses implement `observe` and `scores` and set
    `n_recent` (newest tokens always kept)."""

    position_mode = "original"  # the class default; __init__ sets the instance's from policy.positions
    config: type = ScoredConfig
    # how the cudagraph backends score on the device (streamkv.backends.scored_eviction.ScoredEviction):
    # "last" = the step's query only (TOVA), "accumulated" = every query since the token's write (H2O),
    # "window" = the last obs_window queries, pooled (SnapKV); None = the graph backends run it eager
    device_scores: Optional[str] = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.position_mode = str(self.pcfg.positions or "original")
        self.n_layers = 1
        self.scale = 1.0
        self.cache = None
        self.reset()

    @classmethod
    def check(cls, cfg) -> None:
        check_knobs(cls, cfg)
        positions = cls.settings(cfg.policy).positions
        if positions is not None and positions not in POSITIONS:
            raise ConfigError(f"policy.positions: '{positions}' is not one of {', '.join(POSITIONS)}")

    @property
    def side_bound(self) -> int | None:
        """Kept tokens that may need re-rotation at a prune in "shift" mode (every kept token may sit
        before a gap): the slot managers size their side buffer with it (streamkv.sizing.cache_sizes)."""
        return self.budget if self.position_mode == "shift" else None

    @property
    def n_recent(self) -> int:
        return 0

    @property
    def budget(self) -> int:
        return self.n_sink + self.window

    def attach(self, decoder, cache, tokenizer=None) -> None:
        self.n_layers = decoder.shape.n_layers
        self.scale = decoder.scale
        self.cache = cache
        self.decoder = decoder
        decoder.attention_observer = self.observe

    def due(self, length: int) -> bool:
        """A prune follows this step (same trigger as `streaming`)."""
        return length > self.n_sink + self.window + self.compress_every - 1

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask) -> None:
        raise NotImplementedError

    def scores(self, length: int) -> np.ndarray:
        """One score per cached slot (higher = keep), for the current cache of `length` tokens."""
        raise NotImplementedError

    def on_evict(self, keep: np.ndarray) -> None:
        """Re-index per-slot state after the cache keeps `keep`."""

    def decide(self, view) -> Optional[Decision]:
        L = len(view.token_pos)
        if not self.due(L):
            return None
        keep = keep_top(self.scores(L), L, self.n_sink, self.n_recent, self.budget)
        self.on_evict(keep)
        return Decision(keep=keep)
