"""Eviction policies: one small class each; `build_policy(cfg)` picks one by `policy.name`."""

from streamkv.policies.base import Decision, Policy, StepView
from streamkv.policies.full import FullPolicy
from streamkv.policies.streaming import StreamingPolicy

POLICIES = {cls.name: cls for cls in (FullPolicy, StreamingPolicy)}


def build_policy(cfg) -> Policy:
    return POLICIES[cfg.policy.name](cfg)


__all__ = ["Decision", "Policy", "StepView", "POLICIES", "build_policy"]
