from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from streamkv.errors import ConfigError
from streamkv.policies.scored import ScoredPolicy, attention_weights, rotate_by

POOLINGS = ("avg", "max")


def snapkv_scores(attn: torch.Tensor, n_window: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's scores of the keys before the observation window.

    attn: [Hkv, G, w, L] attention of the w observation queries (softmax over all L keys). Mean over
    the queries, 1D pooling along the keys (stride 1, same length), mean over the G query heads of
    each KV group, then (one decision for all heads) mean over the KV heads -> [L - n_window].
    """
    Hkv, G, _, L = attn.shape
    n = L - n_window
    if n <= 0:
        return attn.new_zeros(0)
    x = attn[..., :n].mean(2).reshape(Hkv * G, 1, n)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    x = pool(x, kernel_size, stride=1, padding=kernel_size // 2)
    return x.reshape(Hkv, G, n).mean(1).mean(0)


class SnapKVPolicy(ScoredPolicy):
    """SnapKV (Li et al. 2024) applied during decoding, every compress_every steps.

    A ring of the last `obs_window` query vectors per layer scores the cache at each prune: their
    attention (softmax over the current cache, causal by text position), averaged over the window,
    pooled with a 1D `kernel_size` kernel (`pooling` avg|max), averaged per KV group (GQA) and then
    over KV heads and layers. Keeps the n_sink sinks, the obs_window newest tokens (the
    observation window) and the top-scored others, n_sink + window in all. Positions: original text
    positions (as kvpress) or, with policy.positions=shift, StreamingLLM's.
    """

    name = "snapkv"
    knobs = ("obs_window", "kernel_size", "pooling", "positions")
    device_scores = "window"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        p = cfg.policy
        if not 1 <= p.obs_window <= cfg.window:
            raise ConfigError(f"policy.obs_window: must be between 1 and window={cfg.window} (got {p.obs_window})")
        if p.kernel_size < 1 or p.kernel_size % 2 == 0:
            raise ConfigError(f"policy.kernel_size: must be an odd number >= 1 (got {p.kernel_size})")
        if p.pooling not in POOLINGS:
            raise ConfigError(f"policy.pooling: '{p.pooling}' is not one of {', '.join(POOLINGS)}")

    @property
    def n_recent(self) -> int:
        return int(self.pcfg.obs_window)

    def reset(self) -> None:
        self._q: dict = {}  # layer -> [H, <=w, D] the most recent query vectors (rotated)
        self._qpos = np.zeros(0, dtype=np.int64)  # their text positions
        self._qrope = np.zeros(0, dtype=np.int64)  # the RoPE positions they were rotated at (shift mode)
        self._acc = None

    def observe(self, layer, q, k, mask) -> None:
        w = self.n_recent
        T = q.shape[2]
        prev = self._q.get(layer)
        self._q[layer] = (q[0] if prev is None else torch.cat([prev, q[0]], dim=1))[:, -w:]
        shift = self.position_mode == "shift"
        if layer == 0:
            self._qpos = np.concatenate([self._qpos, self.cache.token_pos[-T:]])[-w:]
            if shift:
                rope = np.asarray(self.decoder.q_pos.cpu().numpy(), dtype=np.int64).reshape(-1)[-T:]
                self._qrope = np.concatenate([self._qrope, rope])[-w:]
        L = k.shape[2]
        if not self.due(L):
            return
        kpos = torch.as_tensor(self.cache.token_pos, device=k.device)
        qpos = torch.as_tensor(self._qpos, device=k.device)
        causal = kpos[None, :] <= qpos[:, None]  # a query sees only keys at or before its position
        q = self._q[layer]
        if shift and layer == 0:
            # StreamingLLM positions: each observation query at the position its token holds in the
            # cache now (= its own key's; prunes since its step moved it), whatever the manager's
            # offset convention: delta = now - when rotated (0 for the slot managers)
            now = self._qrope[-1] - (self._qpos[-1] - self._qpos)
            self._qdelta = torch.as_tensor(now - self._qrope, device=k.device)
        if shift and bool((self._qdelta != 0).any()):
            q = rotate_by(q, self._qdelta, self.decoder.base.rotary_emb.inv_freq)
        attn = attention_weights(q[None], k, causal, self.scale)
        s = snapkv_scores(attn, min(w, L), int(self.pcfg.kernel_size), str(self.pcfg.pooling))
        self._acc = s if layer == 0 or self._acc is None else self._acc + s

    def scores(self, length: int) -> np.ndarray:
        out = np.zeros(length)
        s = self._acc.cpu().numpy()
        out[:len(s)] = s  # the observation window itself is always kept (n_recent)
        return out
