"""How many tokens a run's cache holds: the policy's bound and build_cache's sizes.

Above both policies and cache managers (the runner layer): a cache manager takes its sizes as
numbers and never asks a policy."""

from __future__ import annotations

from streamkv.policies import build_policy


def policy_bound(cfg, policy=None) -> int | None:
    """The most tokens the policy lets the cache hold during a step (its input token included, before
    the prune): the policy's `capacity`; None if the policy never evicts (full)."""
    if cfg.policy.name == "full":
        return None
    if policy is None:
        policy = build_policy(cfg)
    bound = getattr(policy, "capacity", None)
    return None if bound is None else int(bound)


def cache_sizes(cfg, n_tokens: int, policy=None) -> dict:
    """build_cache's sizes for a run over `n_tokens` tokens: capacity (tokens held at most) = the
    `cache.capacity` override if set, else the policy's bound, at least the prefill and at most the
    text; side_capacity = sinks + refresh budget, or the policy's `side_bound` (score-based policies
    with positions=shift) (the side tokens that get re-rotated; a hint, the side buffer grows if a
    policy exceeds it)."""
    explicit = cfg.cache.get("capacity")
    if explicit is not None:
        capacity = int(explicit)
    else:
        bound = policy_bound(cfg, policy)
        capacity = n_tokens if bound is None else min(max(bound, int(cfg.prefill_tokens)), n_tokens)
    side = int(cfg.n_sink) + int(cfg.policy.get("refresh_budget") or 0)
    if policy is None:
        policy = build_policy(cfg)
    # score-based policies with positions=shift: any kept token may sit before a gap
    side = max(side, int(getattr(policy, "side_bound", None) or 0))
    return {"capacity": max(1, capacity), "side_capacity": max(1, side)}


__all__ = ["cache_sizes", "policy_bound"]
