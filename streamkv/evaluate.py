"""The measurement protocol: prefill, then teacher-forced decode one token per step, with the
policy deciding after every step and the cache manager carrying it out.

Timing: streamkv/timing.py's `timed_decode`, the loop the graph path runs too (CUDA synchronized around
the timed regions, no per-token sync); a warm-up of a few decode steps on a fresh cache runs first and is
discarded. TPOT = decode time / decode tokens. TTFT = prefill time, or the first decode step's time when
prefill_tokens = 0.

Attention kernels on CUDA: the host-driven decode attends without cuDNN's SDPA (see `host_attention`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from streamkv.policies import StepView
from streamkv.scoring import score
from streamkv.timing import sync, timed_decode


@dataclass
class EvalResult:
    index: np.ndarray  # text position of each predicted token
    token_id: np.ndarray
    nll: np.ndarray
    entropy: np.ndarray  # predictive entropy of the step that predicted the token (nats)
    visible_kv: np.ndarray  # cached tokens attended besides the step's own input
    events: list = field(default_factory=list)
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_s: float = 0.0
    peak_mem_mb: float = 0.0
    decode_peak_mem_mb: float = float("nan")  # CUDA: peak over the decode phase alone (prefill logits excluded)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    # host wall time from the start of each decode step to the start of the next (the last: to the closing
    # sync), ms; NaN for the prefill's tokens. Asynchronous paths run ahead of the GPU, so read single values
    # as a distribution, not as one step's GPU time.
    step_ms: np.ndarray | None = None
    top1: np.ndarray | None = None  # bool: the token was the step's top-1 prediction (ties count as top-1)
    # the largest RoPE position of a query in the run's position scheme: StreamingLLM's (cache order from
    # 0; managers that rotate everything by a common offset report the equivalent) or the original text
    # positions (policy=full, score policies with positions=original)
    max_position: int | None = None
    answer: np.ndarray | None = None  # bool per predicted token: its target is an answer token (passkey)


# cuDNN's SDPA (torch's first choice on an H100) builds and caches an execution plan for every new key
# length, ~40 ms each: a host-driven decode whose cache grows pays that on every step until the window
# fills, once per process, so the same eager config measured 25 or 48 ms/token depending on what ran
# before it in the process (docs/results/README.md, finding 7). The other kernels need no plans.
HOST_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def host_attention(device: torch.device):
    """The attention kernels of the host-driven decode (a context manager; CPU: unchanged)."""
    return sdpa_kernel(HOST_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def score_tokens(logits: torch.Tensor, targets: torch.Tensor):
    """Per-position NLL, entropy (float32) and top-1 (bool) of `targets` under `logits` [T, V]."""
    return score(logits, targets, top1=True)


class Evaluator:
    def __init__(self, decoder, cache, policy, device: torch.device, progress: bool = True):
        self.decoder, self.cache, self.policy, self.device = decoder, cache, policy, device
        self.progress = progress

    def _reset(self) -> None:
        self.cache.reset()
        self.policy.reset()

    def _maybe_prune(self, step: int, events: list | None) -> None:
        before = len(self.cache)
        decision = self.policy.decide(StepView(token_pos=self.cache.token_pos, step=step, entropy=self._entropy,
                                               token_ids=self._ids_np))
        if decision is None:
            return
        self.cache.evict(decision.keep)
        if events is not None:
            events.append(decision.event(step, before))

    def _prepare(self, ids: torch.Tensor) -> None:
        self._ids_np = ids.cpu().numpy()
        self._entropy = torch.zeros(len(ids), device=self.device)

    def warm_up(self, ids: torch.Tensor, prefill: int, steps: int) -> None:
        with host_attention(self.device):
            self._warm_up(ids, prefill, steps)

    def run(self, ids: torch.Tensor, prefill: int) -> EvalResult:
        with host_attention(self.device):
            return self._run(ids, prefill)

    def _warm_up(self, ids: torch.Tensor, prefill: int, steps: int) -> None:
        if steps <= 0:
            return
        self._reset()
        self._prepare(ids)
        if prefill:
            logits = self.decoder.forward(ids[None, :prefill], self.cache)[0]
            _, self._entropy[:prefill], _ = score_tokens(logits, ids[1:prefill + 1])
            self._maybe_prune(prefill - 1, None)
        for t in range(prefill, min(prefill + steps, len(ids) - 1)):
            logits = self.decoder.forward(ids[None, t:t + 1], self.cache)[0]
            _, self._entropy[t:t + 1], _ = score_tokens(logits, ids[t + 1:t + 2])
            self._maybe_prune(t, None)
        sync(self.device)

    def _run(self, ids: torch.Tensor, prefill: int) -> EvalResult:
        n = len(ids)
        dev = self.device
        self._reset()
        self._prepare(ids)
        nll = torch.zeros(n - 1, device=dev)
        top1 = torch.zeros(n - 1, device=dev, dtype=torch.bool)
        max_pos = 0  # host bookkeeping: no sync
        entropy = self._entropy[: n - 1]  # a view: policies read it through StepView
        visible = np.zeros(n - 1, dtype=np.int32)
        events: list = []

        def run_prefill(P: int) -> None:
            nonlocal max_pos
            logits = self.decoder.forward(ids[None, :P], self.cache)[0]
            nll[:P], entropy[:P], top1[:P] = score_tokens(logits, ids[1:P + 1])
            max_pos = self.cache.query_position()
            visible[:P] = np.arange(P)
            self._maybe_prune(P - 1, events)

        def run_step(t: int) -> None:
            nonlocal max_pos
            visible[t] = len(self.cache)
            logits = self.decoder.forward(ids[None, t:t + 1], self.cache)[0]
            nll[t:t + 1], entropy[t:t + 1], top1[t:t + 1] = score_tokens(logits, ids[t + 1:t + 2])
            max_pos = max(max_pos, self.cache.query_position())
            self._maybe_prune(t, events)

        def bar(steps):
            return tqdm(steps, desc="decode", unit="tok", disable=not self.progress, mininterval=0.5, leave=False)

        timing = timed_decode(dev, n, prefill, run_prefill, run_step, progress=bar)
        ids_np = ids.cpu().numpy()
        return EvalResult(
            index=np.arange(1, n), token_id=ids_np[1:], nll=nll.cpu().numpy(), entropy=entropy.cpu().numpy(),
            visible_kv=visible, events=events, top1=top1.cpu().numpy(), max_position=int(max_pos),
            **timing.fields())
