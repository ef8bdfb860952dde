"""Eviction policies: one small class each; `build_policy(cfg)` picks one by `policy.name`."""

from streamkv.policies.base import Decision, Policy, StepView
from streamkv.policies.full import FullPolicy
from streamkv.policies.streaming import StreamingPolicy

POLICIES = {cls.name: cls for cls in (FullPolicy, StreamingPolicy)}


def check_policy(cfg) -> None:
    """Raise ConfigError (one line) for an unknown policy or a bad knob combination."""
    from streamkv.errors import ConfigError

    if cfg.policy.name not in POLICIES:
        raise ConfigError(f"policy: '{cfg.policy.name}' is not one of {', '.join(sorted(POLICIES))}")
    POLICIES[cfg.policy.name].check(cfg)


def build_policy(cfg) -> Policy:
    return POLICIES[cfg.policy.name](cfg)


__all__ = ["Decision", "Policy", "StepView", "POLICIES", "build_policy", "check_policy"]
