"""The lazy-streaming core: StreamingLLM (n_sink sinks + a recent window) pruned lazily, with four
small composable pieces. Every controlled policy (streaming, max_drop, overlap, refresh, adaptive)
is a preset of this one class; knobs of different pieces compose (docs/policies.md).

Cache layout (cache order = text order, which `keep` ascending preserves):

    [ sinks: n_sink ][ refresh region: 0..refresh_budget ][ body: the contiguous most recent tokens ]

Per step, with body = tokens after the sinks and the refresh region:
  trigger   (when)   periodic: body > window + R - 1 (R = compress_every; R = 1 is strict StreamingLLM)
                     adaptive slack: body > window + extra_slack
                     adaptive entropy: body > window + s(recent entropy), s in [0, extra_slack]
  target    (to)     body -> window + overlap                                  (overlap piece)
  cap       (how much) drop at most max_drop; the rest on the following steps  (max_drop piece,
                     "pruning mode": prune every step, whatever the trigger, until body <= target)
  refresh   (rescue) up to M tokens of the dropped segment join the refresh region; when it holds
                     more than refresh_budget, its oldest tokens leave first (refresh_keep=fifo) or
                     its lowest-scored (refresh_keep=score)                           (refresh piece)

refresh_select=attention scores the cache with SnapKV's rule (streamkv.policies.snapkv.QueryWindow: the
attention of the last obs_window queries, pooled, mean over heads, summed over layers), only on the steps
that may end with a prune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from streamkv.errors import ConfigError
from streamkv.policies.base import Decision, Policy, check_knobs, knob_is_set, read_settings
from streamkv.policies.pieces import (ADAPTIVE_MODES, REFRESH_KEEPS, REFRESH_SELECTS, TokenClasses,
                                      entropy_slack, refresh_region, select_refresh)
from streamkv.policies.snapkv import QueryWindow, WindowScoreConfig, check_window_knobs


@dataclass
class LazyConfig(WindowScoreConfig):
    """The knobs of the lazy core's pieces, each neutral (off) at its default; every preset but `streaming`
    takes all of them (they compose). obs_window / kernel_size / pooling: refresh_select=attention only."""

    max_drop: Optional[int] = None  # cap on tokens dropped per prune; larger overflows prune over several steps
    overlap: int = 0  # extra recent tokens kept by each prune (< compress_every): drops R - overlap per prune
    refresh_budget: int = 0  # size of the dynamic sink region fed from evicted segments (0 = off)
    refresh_per_prune: Optional[int] = None  # M: tokens refreshed per prune (None = refresh_budget)
    refresh_select: str = "uniform"  # uniform | structural | entropy | attention
    refresh_keep: str = "fifo"  # which refresh tokens stay when the region is full: fifo (oldest leave) | score
    mode: Optional[str] = None  # adaptive trigger: slack | entropy (None = the fixed period compress_every)
    extra_slack: int = 0  # adaptive: the cache may exceed n_sink + window by this many tokens
    entropy_window: int = 16  # adaptive entropy: steps averaged into the "recent entropy"
    entropy_low: float = 2.0  # nats: at or below, the cache may grow to the full extra_slack
    entropy_high: float = 4.0  # nats: at or above, prune at once (no slack); linear in between


# The knobs of each piece (fields of LazyConfig); the first is the piece's switch.
PIECES = {
    "max_drop": ("max_drop",),
    "overlap": ("overlap",),
    "refresh": ("refresh_budget", "refresh_per_prune", "refresh_select", "refresh_keep", "obs_window",
                "kernel_size", "pooling"),
    "adaptive": ("mode", "extra_slack", "entropy_window", "entropy_low", "entropy_high"),
}
ATTENTION_KNOBS = ("refresh_keep", "obs_window", "kernel_size", "pooling")  # only with refresh_select=attention


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _to_host(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


class LazyStreamingPolicy(Policy):
    """The core. Presets subclass it, set `name`, and name the piece they are about (`piece`):
    that piece's switch knob may be required (`requires`), and its sub-knobs may be swept even
    while its switch is at the neutral value (a control point, e.g. refresh_budget=0)."""

    name = "lazy"
    config: type = LazyConfig
    piece: Optional[str] = None
    requires: Optional[str] = None  # switch knob the preset cannot run without

    @classmethod
    def settings(cls, policy_cfg) -> LazyConfig:
        """Every lazy knob (neutral where the preset takes none: `streaming`)."""
        return read_settings(LazyConfig, policy_cfg)

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.pcfg
        self.max_drop = None if p.max_drop is None else int(p.max_drop)
        self.overlap = int(p.overlap)
        self.refresh_budget = int(p.refresh_budget)
        m = p.refresh_budget if p.refresh_per_prune is None else p.refresh_per_prune
        self.refresh_per_prune = min(int(m), self.refresh_budget)
        self.refresh_select = str(p.refresh_select)
        self.refresh_keep = str(p.refresh_keep or "fifo")
        # refresh_select=attention: the SnapKV-style scorer, fed by the decoder's attention observer
        self._window = None
        if self.refresh_per_prune > 0 and self.refresh_select == "attention":
            self._window = QueryWindow(p.obs_window, p.kernel_size, p.pooling, shift=True)
        self.mode = None if p.mode is None else str(p.mode)
        # largest body beyond `window` that may stay in the cache after a step (the prune bound)
        self.max_slack = self.compress_every - 1 if self.mode is None else int(p.extra_slack)
        self.entropy_window = int(p.entropy_window)
        self.entropy_low, self.entropy_high = float(p.entropy_low), float(p.entropy_high)
        self._classes: Optional[TokenClasses] = None
        self.reset()

    # ------------------------------------------------------------------ config

    @classmethod
    def check(cls, cfg) -> None:
        check_knobs(cls, cfg)
        if not cls.knobs():  # a preset that takes no knobs (streaming): nothing else to check
            return
        p, R = cls.settings(cfg.policy), cfg.compress_every
        if cls.requires is not None:
            _need(getattr(p, cls.requires) is not None,
                  f"policy.{cls.requires}: required for policy={cls.name} (see docs/policies.md)")
        if p.max_drop is not None:
            _need(p.max_drop >= 1, f"policy.max_drop: must be >= 1 (got {p.max_drop})")
        _need(p.overlap >= 0, f"policy.overlap: must be >= 0 (got {p.overlap})")
        _need(p.refresh_budget >= 0, f"policy.refresh_budget: must be >= 0 (got {p.refresh_budget})")
        _need(p.refresh_select in REFRESH_SELECTS,
              f"policy.refresh_select: '{p.refresh_select}' is not one of {', '.join(REFRESH_SELECTS)}")
        _need(p.refresh_keep in REFRESH_KEEPS,
              f"policy.refresh_keep: '{p.refresh_keep}' is not one of {', '.join(REFRESH_KEEPS)}")
        if p.refresh_select == "attention":
            check_window_knobs(p, cfg.window)
        else:  # the scores exist only with the attention selection
            for knob in ATTENTION_KNOBS:
                _need(not knob_is_set(p, knob), f"policy.{knob}: only used with policy.refresh_select=attention "
                                                  f"(got refresh_select={p.refresh_select})")
        if p.refresh_per_prune is not None:
            _need(p.refresh_per_prune >= 1, f"policy.refresh_per_prune: must be >= 1 (got {p.refresh_per_prune})")
            _need(p.refresh_budget == 0 or p.refresh_per_prune <= p.refresh_budget,
                  f"policy.refresh_per_prune: must be <= policy.refresh_budget "
                  f"(got {p.refresh_per_prune} > {p.refresh_budget})")
        if p.mode is None:
            _need(p.overlap < R, f"policy.overlap: must be < compress_every (got {p.overlap} >= {R})")
        else:
            _need(p.mode in ADAPTIVE_MODES, f"policy.mode: '{p.mode}' is not one of {', '.join(ADAPTIVE_MODES)}")
            _need(R == 1, f"compress_every: policy.mode={p.mode} replaces the fixed period by policy.extra_slack; "
                          f"leave compress_every at 1 (got {R})")
            _need(p.extra_slack >= 0, f"policy.extra_slack: must be >= 0 (got {p.extra_slack})")
            _need(p.overlap <= p.extra_slack,
                  f"policy.overlap: must be <= policy.extra_slack with policy.mode set "
                  f"(got {p.overlap} > {p.extra_slack})")
            _need(p.entropy_window >= 1, f"policy.entropy_window: must be >= 1 (got {p.entropy_window})")
            _need(0 <= p.entropy_low < p.entropy_high,
                  f"policy.entropy_low: must be >= 0 and < policy.entropy_high "
                  f"(got {p.entropy_low}, {p.entropy_high})")
        # a sub-knob whose piece is switched off does nothing: an error, except on the preset of that
        # piece (where e.g. refresh_budget=0 is the control point of a sweep over refresh_select)
        off = {"refresh": p.refresh_budget == 0, "adaptive": p.mode is None}
        for piece, is_off in off.items():
            if is_off and cls.piece != piece:
                for knob in PIECES[piece][1:]:
                    if knob_is_set(p, knob):
                        switch = PIECES[piece][0]
                        raise ConfigError(f"policy.{knob}: has no effect while policy.{switch} is off "
                                          f"(set policy.{switch}, or use policy={piece})")
        if p.mode == "slack" and cls.piece != "adaptive":
            for knob in ("entropy_window", "entropy_low", "entropy_high"):
                if knob_is_set(p, knob):
                    raise ConfigError(f"policy.{knob}: only used with policy.mode=entropy (got mode=slack)")

    @property
    def capacity(self) -> int:
        return self.n_sink + self.refresh_budget + self.window + self.max_slack + 1

    # ------------------------------------------------------------------ run

    @property
    def scores_attention(self) -> bool:
        """The refresh selection reads attention scores (refresh_select=attention with a budget): the graph
        backends decide it on the device (streamkv.backends.refresh_graph)."""
        return self._window is not None

    def attach(self, decoder, cache, tokenizer=None) -> None:
        if self._window is not None:
            self._window.bind(decoder, cache)
            decoder.attention_observer = self._observe
        if self.refresh_budget and self.refresh_select == "structural":
            if tokenizer is None:
                raise ValueError("policy.refresh_select=structural needs the tokenizer (attach(..., tokenizer))")
            self._classes = TokenClasses(tokenizer)

    def reset(self) -> None:
        self.n_refresh = 0  # tokens in the refresh region (slots n_sink .. n_sink + n_refresh - 1)
        self.pruning = False  # max_drop's pruning mode: an overflow left over from the last prune
        if self._window is not None:
            self._window.reset()

    def _observe(self, layer, q, k, mask) -> None:
        """attention_observer (refresh_select=attention): score the cache only when this step may prune.
        k: the cache in cache order, the step's tokens included (as `decide` will see it)."""
        L = k.shape[2]
        body = L - min(self.n_sink, L) - self.n_refresh
        may = body > self.window + self.overlap and (
            self.pruning or body > self.window + self.max_slack or self.mode == "entropy")
        self._window.observe(layer, q, k, score=may)

    def recent_entropy(self, view) -> float:
        lo = max(0, view.step - self.entropy_window + 1)
        return float(_to_host(view.entropy[lo:view.step + 1]).mean())

    def _due(self, view, body: int) -> bool:
        if body > self.window + self.max_slack:
            return True
        if self.mode == "entropy":  # reads the entropy on the host: one sync per step on a GPU
            slack = entropy_slack(self.recent_entropy(view), self.max_slack, self.entropy_low, self.entropy_high)
            return body > self.window + slack
        return False

    def decide(self, view) -> Optional[Decision]:
        pos = view.token_pos
        L = len(pos)
        S = min(self.n_sink, L)
        r = self.n_refresh
        body = L - S - r
        target = self.window + self.overlap
        if body <= target:
            self.pruning = False
            return None
        if not self.pruning and not self._due(view, body):
            return None
        n_drop = body - target if self.max_drop is None else min(body - target, self.max_drop)
        self.pruning = body - n_drop > target
        start = S + r  # the dropped segment: the oldest n_drop tokens of the body
        new_ref = np.zeros(0, dtype=np.int64)
        scores = None if self._window is None else self._window.scores(L)  # one per cached slot
        if self.refresh_per_prune > 0:
            seg_pos = pos[start:start + n_drop]
            ent = None
            if self.refresh_select == "entropy":
                ent = _to_host(view.entropy[seg_pos.tolist()] if hasattr(view.entropy, "detach")
                               else np.asarray(view.entropy)[seg_pos])
            picks = select_refresh(self.refresh_select, self.refresh_per_prune, seg_pos, entropy=ent,
                                   token_ids=view.token_ids, classes=self._classes,
                                   scores=None if scores is None else scores[start:start + n_drop])
            new_ref = start + picks
        ref = np.concatenate([np.arange(S, S + r), new_ref]).astype(np.int64)
        ref = ref[refresh_region(self.refresh_keep, ref, self.refresh_budget,
                                 None if scores is None else scores[ref])]
        self.n_refresh = len(ref)
        keep = np.concatenate([np.arange(S), ref, np.arange(start + n_drop, L)]).astype(np.int64)
        return Decision(keep=keep, refreshed=len(new_ref))
