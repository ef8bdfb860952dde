"""The policy interface: a policy only *decides* which cached tokens stay; it never touches K/V."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Decision:
    """Keep these cache slots (indices into the current cache order, ascending); drop the rest."""

    keep: np.ndarray
    refreshed: int = 0  # tokens moved into the refresh region by this prune (refresh policies)
    info: dict = field(default_factory=dict)

    def event(self, step: int, before: int) -> dict:
        """This prune's row of events.parquet: made after `step`, on a cache of `before` tokens."""
        after = len(self.keep)
        return {"step": int(step), "dropped": before - after, "kept": after, "visible_before": before,
                "visible_after": after, "refreshed": int(self.refreshed)}


@dataclass
class StepView:
    """What a policy may look at after a step.

    token_pos: original text positions of the cached tokens, in cache order (host, cheap).
    step: text position of the step's (last) input token.
    entropy: device tensor; entropy[i] = predictive entropy (nats) of the step whose input was
      text position i (filled up to `step`). Reading it on the host syncs the GPU: only the
      entropy-driven policies should.
    token_ids: the whole text's token ids (host numpy), e.g. for structural token choices.
    """

    token_pos: np.ndarray
    step: int
    entropy: Optional[object] = None
    token_ids: Optional[np.ndarray] = None


class Policy:
    """Base class. Subclasses set `name` and implement `decide`.

    position_mode: "shift" = StreamingLLM (kept tokens get contiguous positions in cache order);
    "original" = each token keeps its position in the text (score-based baselines, as kvpress).
    """

    name = "base"
    position_mode = "shift"
    knobs: tuple = ()  # the `policy.<knob>` fields this policy takes; any other knob must stay at its default

    def __init__(self, cfg):
        self.n_sink = int(cfg.n_sink)
        self.window = int(cfg.window)
        self.compress_every = int(cfg.compress_every)
        self.pcfg = cfg.policy

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError (one line naming the field) if cfg's knobs make no sense for this policy."""
        check_knobs(cls, cfg)

    @property
    def capacity(self) -> int:
        """Most tokens the cache holds during a decode step (its input token included), i.e. the
        largest cache before a prune: what a preallocating cache manager must hold."""
        return self.n_sink + self.window + self.compress_every

    def attach(self, decoder, cache, tokenizer=None) -> None:
        """Called once before the run: score-based policies hook `decoder.attention_observer` here,
        token-class policies read the tokenizer."""

    def reset(self) -> None:
        """Forget per-run state (called before warm-up and before the timed run)."""

    def decide(self, view: StepView) -> Optional[Decision]:
        raise NotImplementedError

    def sink_and_recent(self, length: int, recent: int) -> np.ndarray:
        """Slots of the first n_sink tokens and the `recent` most recent ones."""
        recent = min(recent, length - self.n_sink)
        return np.concatenate([np.arange(self.n_sink), np.arange(length - recent, length)])


def knob_defaults() -> dict:
    """Neutral value of every `policy.<knob>` (the PolicyConfig dataclass defaults)."""
    from dataclasses import fields

    from streamkv.config import PolicyConfig

    return {f.name: f.default for f in fields(PolicyConfig) if f.name != "name"}


def knob_is_set(cfg, knob: str) -> bool:
    return cfg.policy.get(knob) != knob_defaults()[knob]


def check_knobs(cls, cfg) -> None:
    """A knob away from its default that `cls` does not take is a config error (one line)."""
    from streamkv.errors import ConfigError

    for knob in knob_defaults():
        if knob not in cls.knobs and knob_is_set(cfg, knob):
            takes = f"its knobs: {', '.join(cls.knobs)}" if cls.knobs else "it takes none"
            raise ConfigError(f"policy.{knob}: not a knob of policy={cls.name} ({takes}; got {cfg.policy.get(knob)})")
