from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamkv.errors import ConfigError
from streamkv.config import PolicyConfig
from streamkv.policies.scored import ScoredConfig, ScoredPolicy, attention_weights, rotate_by

POOLINGS = ("avg", "max")


def pooled_scores(x: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's score of one layer from the observation queries' mean attention x [..., Hkv, G, n] (keys in
    cache order; keys not scored zeroed): 1D pooling along the keys (stride 1, same length), mean over the
    G query heads of each KV group, then (one decision for all heads) mean over the KV heads -> [..., n]
    (leading dims: e.g. the layers, scored together). Summed over the layers by the caller (the host
    QueryWindow, and the graph's ScoredEviction)."""
    *lead, Hkv, G, n = x.shape
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    x = pool(x.reshape(-1, 1, n), kernel_size, stride=1, padding=kernel_size // 2)
    return x.reshape(*lead, Hkv, G, n).mean(-2).mean(-2)


def snapkv_scores(attn: torch.Tensor, n_window: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's scores of the keys before the observation window.

    attn: [Hkv, G, w, L] attention of the w observation queries (softmax over all L keys). Mean over
    the queries, then pooled_scores -> [L - n_window].
    """
    n = attn.shape[-1] - n_window
    if n <= 0:
        return attn.new_zeros(0)
    return pooled_scores(attn[..., :n].mean(2), kernel_size, pooling)


@dataclass
class WindowScoreConfig(PolicyConfig):
    """The knobs of SnapKV's score (snapkv, and the lazy core's refresh_select=attention)."""

    obs_window: int = 8  # recent queries that score the cache (snapkv: and recent tokens always kept)
    kernel_size: int = 5  # 1D pooling kernel over the scores (odd)
    pooling: str = "avg"  # avg | max


@dataclass
class SnapKVConfig(ScoredConfig, WindowScoreConfig):
    name: str = "snapkv"


def check_window_knobs(p: WindowScoreConfig, window: int) -> None:
    """obs_window / kernel_size / pooling in range (p: the policy's settings)."""
    if not 1 <= p.obs_window <= window:
        raise ConfigError(f"policy.obs_window: must be between 1 and window={window} (got {p.obs_window})")
    if p.kernel_size < 1 or p.kernel_size % 2 == 0:
        raise ConfigError(f"policy.kernel_size: must be an odd number >= 1 (got {p.kernel_size})")
    if p.pooling not in POOLINGS:
        raise ConfigError(f"policy.pooling: '{p.pooling}' is not one of {', '.join(POOLINGS)}")


class QueryWindow:
    """The last `w` query vectors of every layer (rotated) and SnapKV's score of the cached keys by them.

    `observe` is the decoder's attention_observer body: it records the step's queries and, when asked to
    `score`, adds this layer's snapkv_scores (causal by text position: a query sees only keys at or before
    its own position) to `acc` (summed over layers). `scores(length)` gives one score per cached slot, 0
    for the w newest (the observation window is not scored). Used by snapkv and by the refresh policy's
    refresh_select=attention (the graph backends compute the same on the device: ScoredEviction).

    shift: StreamingLLM positions; each window query is re-rotated to the position its token holds in
    the cache now (prunes since its step moved it), as its own key is.
    """

    def __init__(self, w: int, kernel_size: int, pooling: str, shift: bool):
        self.w, self.kernel_size, self.pooling, self.shift = int(w), int(kernel_size), str(pooling), shift
        self.decoder = self.cache = None
        self.reset()

    def bind(self, decoder, cache) -> None:
        self.decoder, self.cache, self.scale = decoder, cache, decoder.scale

    def reset(self) -> None:
        self._q: dict = {}  # layer -> [H, <=w, D] the most recent query vectors (rotated)
        self._qpos = np.zeros(0, dtype=np.int64)  # their text positions
        self._qrope = np.zeros(0, dtype=np.int64)  # the RoPE positions they were rotated at (shift mode)
        self.acc = None  # this step's scores, summed over the layers so far (None: not scored this step)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, score: bool) -> None:
        w = self.w
        T = q.shape[2]
        prev = self._q.get(layer)
        self._q[layer] = (q[0] if prev is None else torch.cat([prev, q[0]], dim=1))[:, -w:]
        shift = self.shift
        if layer == 0:
            self.acc = None
            self._qpos = np.concatenate([self._qpos, self.cache.token_pos[-T:]])[-w:]
            if shift:
                rope = np.asarray(self.decoder.q_pos.cpu().numpy(), dtype=np.int64).reshape(-1)[-T:]
                self._qrope = np.concatenate([self._qrope, rope])[-w:]
        if not score:
            return
        L = k.shape[2]
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
        s = snapkv_scores(attn, min(w, L), self.kernel_size, self.pooling)
        self.acc = s if layer == 0 or self.acc is None else self.acc + s

    def scores(self, length: int) -> np.ndarray:
        if self.acc is None:
            raise RuntimeError("QueryWindow.scores: the cache was not scored on this step (observe(score=True))")
        out = np.zeros(length)
        s = self.acc.cpu().numpy()
        out[:len(s)] = s  # the observation window itself is not scored
        return out


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
    config: type = SnapKVConfig
    device_scores = "window"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_window_knobs(cls.settings(cfg.policy), cfg.window)

    @property
    def n_recent(self) -> int:
        return int(self.pcfg.obs_window)

    def reset(self) -> None:
        self.qwindow = QueryWindow(self.n_recent, self.pcfg.kernel_size, self.pcfg.pooling,
                                  self.position_mode == "shift")
        if self.cache is not None:
            self.qwindow.bind(self.decoder, self.cache)

    def attach(self, decoder, cache, tokenizer=None) -> None:
        super().attach(decoder, cache, tokenizer)
        self.qwindow.bind(decoder, cache)

    def observe(self, layer, q, k, mask) -> None:
        self.qwindow.observe(layer, q, k, score=self.due(k.shape[2]))

    def scores(self, length: int) -> np.ndarray:
        return self.qwindow.scores(length)
