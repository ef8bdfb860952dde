"""Scoring a prediction: the per-token NLL, entropy and top-1 of the next token, the same arithmetic for
the host-driven evaluator, the graph step and the HF baselines (bottom layer: torch only)."""

from __future__ import annotations

import torch


def score(logits: torch.Tensor, targets: torch.Tensor, top1: bool = False):
    """Per-position NLL and predictive entropy (float32) of `targets` under `logits` [T, V]; with
    top1=True also whether each target is the top-1 prediction (bool; a tie with the maximum counts)."""
    logp = logits.float().log_softmax(-1)
    target_logp = logp.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    if not top1:
        return -target_logp, entropy
    return -target_logp, entropy, target_logp >= logp.amax(-1)
