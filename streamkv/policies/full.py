from __future__ import annotations

from dataclasses import dataclass

from streamkv.config import PolicyConfig
from streamkv.policies.base import Policy


@dataclass
class FullConfig(PolicyConfig):
    name: str = "full"


class FullPolicy(Policy):
    """No eviction: the oracle (equals one plain forward pass over the whole text)."""

    name = "full"
    config: type = FullConfig

    @property
    def capacity(self):
        return None  # unbounded: the cache holds the whole text

    def decide(self, view):
        return None
