from __future__ import annotations

from streamkv.policies.base import Policy


class FullPolicy(Policy):
    """No eviction: the oracle (equals one plain forward pass over the whole text)."""

    name = "full"

    @property
    def capacity(self):
        return None  # unbounded: the cache holds the whole text

    def decide(self, view):
        return None
