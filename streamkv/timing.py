"""How a run is timed: host syncs, peak memory and the one timed-decode loop that every evaluator runs
(streamkv.evaluate.Evaluator, the graph path's GraphEvaluator). Bottom layer: imports no other streamkv
module.

Protocol: CUDA is synchronized around the timed regions, never per token (asynchronous paths run ahead
of the GPU). prefill_ms = the prefill's time (0 without one); TTFT = prefill_ms, or the first decode
step's time when there is no prefill; decode_ms = the decode steps, to the closing sync; step_ms[t] = the
host time from the start of step t to the start of step t + 1 (the last: to the closing sync). Peak
memory on CUDA: over the whole run, and over the decode alone (a new peak window after the prefill, so
that the prefill's [P, vocab] logits do not hide the cache's growth); on the CPU the process's peak RSS.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STREAMS: dict = {}


def kept_stream(device: torch.device, role: str, priority: int = 0) -> "torch.cuda.Stream":
    """One stream per device and role, kept for the process: cuBLAS keeps a workspace (32 MiB on Hopper) per
    stream it has seen, so a new stream per capture would add one per run of a sweep."""
    key = (str(device), role)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device, priority=priority)
    return _STREAMS[key]


def capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream for CUDA-graph warm-up and capture."""
    return kept_stream(device, "capture")


def reset_peak(device: torch.device) -> float:
    """CUDA: the peak allocated so far (MB), then start a new peak window (the decode phase); else NaN."""
    if device.type != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def peak_memory_mb(device: torch.device, prefill_peak: float) -> tuple[float, float]:
    """(peak over the run, peak over the decode) in MB, at the end of a run whose decode window was opened
    by `reset_peak` (which returned `prefill_peak`). CPU: (the process's peak RSS, NaN)."""
    if device.type == "cuda":
        decode_peak = torch.cuda.max_memory_allocated(device) / 2**20
        return max(prefill_peak, decode_peak), decode_peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, float("nan")  # ru_maxrss: KiB on Linux


def step_durations_ms(stamps: np.ndarray) -> np.ndarray:
    """Per predicted token (n - 1 of them): stamps[t + 1] - stamps[t] in ms, from the start times of the
    decode steps (NaN before the first) and the end of the decode in stamps[n - 1]."""
    return np.diff(stamps) * 1e3


@dataclass
class DecodeTiming:
    """The timing fields of a run's result (streamkv.evaluate.EvalResult has the same names)."""

    prefill_ms: float
    ttft_ms: float
    decode_ms: float
    total_s: float
    peak_mem_mb: float
    decode_peak_mem_mb: float
    prefill_tokens: int
    decode_tokens: int
    step_ms: np.ndarray

    def fields(self) -> dict:
        return asdict(self)


def timed_decode(device: torch.device, n: int, prefill: int, run_prefill: Callable[[int], None],
                 run_step: Callable[[int], None], progress: Callable | None = None) -> DecodeTiming:
    """Time one run over a text of n tokens: `run_prefill(prefill)` (when prefill > 0), then `run_step(t)`
    for t = prefill .. n - 2 (the step whose input is text position t), as the module docstring says.
    `progress(steps)`: an optional wrapper of the step range with a `close()` (a progress bar)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    prefill_ms = 0.0
    if prefill:
        run_prefill(prefill)
        sync(device)
        prefill_ms = (time.perf_counter() - start) * 1e3
    prefill_peak = reset_peak(device)
    ttft_ms = prefill_ms

    decode_start = time.perf_counter()
    steps = range(prefill, n - 1)
    stamps = np.full(n, np.nan)  # stamps[t]: when step t started
    bar = progress(steps) if progress is not None else steps
    for t in bar:
        stamps[t] = time.perf_counter()
        run_step(t)
        if t == prefill and not prefill:
            sync(device)
            ttft_ms = (time.perf_counter() - decode_start) * 1e3
    if progress is not None:
        bar.close()
    sync(device)
    end = time.perf_counter()
    stamps[n - 1] = end
    peak_mb, decode_peak = peak_memory_mb(device, prefill_peak)
    return DecodeTiming(prefill_ms=prefill_ms, ttft_ms=ttft_ms, decode_ms=(end - decode_start) * 1e3,
                        total_s=end - start, peak_mem_mb=peak_mb, decode_peak_mem_mb=decode_peak,
                        prefill_tokens=prefill, decode_tokens=n - 1 - prefill, step_ms=step_durations_ms(stamps))
