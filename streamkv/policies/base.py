"""The policy interface: a policy only *decides* which cached tokens stay; it never touches K/V."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

import numpy as np

from streamkv.config import PolicyConfig
from streamkv.errors import ConfigError


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
    """Base class. Subclasses set `name` and `config` (their config dataclass: the `policy.<knob>` fields they
    take, with their defaults) and implement `decide`. `self.pcfg` is that dataclass, read from the run config.

    position_mode: "shift" = StreamingLLM (kept tokens get contiguous positions in cache order);
    "original" = each token keeps its position in the text (score-based baselines, as kvpress).
    """

    name = "base"
    position_mode = "shift"
    config: type = PolicyConfig

    def __init__(self, cfg):
        self.n_sink = int(cfg.n_sink)
        self.window = int(cfg.window)
        self.compress_every = int(cfg.compress_every)
        self.pcfg = self.settings(cfg.policy)

    @classmethod
    def knobs(cls) -> tuple:
        """The `policy.<knob>` fields this policy takes (its config's fields); any other knob must stay neutral."""
        return tuple(f.name for f in fields(cls.config) if f.name != "name")

    @classmethod
    def settings(cls, policy_cfg):
        """The knobs this policy reads, as a dataclass filled from the composed `policy` node."""
        return read_settings(cls.config, policy_cfg)

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


def read_settings(schema: type, policy_cfg):
    """`schema` (a config dataclass) with its fields taken from `policy_cfg` (the composed `policy` node, or a
    dict) where present, the rest at their defaults; a value of the wrong type is a ConfigError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    names = {f.name for f in fields(schema)}
    values = {k: policy_cfg[k] for k in policy_cfg if k in names}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "key", None) or "?"
        raise ConfigError(f"policy.{key}: {str(exc).splitlines()[0]}") from None


def knob_defaults() -> dict:
    """The neutral value of every `policy.<knob>` of every policy: its default in the config dataclass that
    introduces it (e.g. LazyConfig's max_drop=None, not MaxDropConfig's preset value 8). Read from every
    PolicyConfig subclass loaded (importing streamkv.policies loads them all)."""
    out: dict = {}
    todo = [PolicyConfig]
    while todo:
        klass = todo.pop()
        todo.extend(klass.__subclasses__())
        inherited = {f.name for base in klass.__bases__ if is_dataclass(base) for f in fields(base)}
        for f in fields(klass):
            if f.name not in inherited and f.name != "name":
                out[f.name] = f.default
    return out


def knob_is_set(settings, knob: str) -> bool:
    """The knob is away from its neutral value (settings: a policy's config dataclass)."""
    return getattr(settings, knob) != knob_defaults()[knob]


def check_knobs(cls, cfg) -> None:
    """Every key of `policy` is a knob of `cls`, or another policy's knob left at its neutral value (it then
    does nothing); else a config error (one line). Also checks the knobs' types."""
    import difflib

    neutral = knob_defaults()
    takes = f"its knobs: {', '.join(cls.knobs())}" if cls.knobs() else "it takes none"
    for key in cfg.policy:
        key = str(key)
        if key == "name" or key in cls.knobs():
            continue
        value = cfg.policy.get(key)
        if key not in neutral:
            close = difflib.get_close_matches(key, list(neutral), n=1)
            hint = f"did you mean policy.{close[0]}?" if close else f"policy={cls.name}: {takes}"
            raise ConfigError(f"policy.{key}: unknown key ({hint})")
        if value != neutral[key]:
            raise ConfigError(f"policy.{key}: not a knob of policy={cls.name} ({takes}; got {value})")
    cls.settings(cfg.policy)
