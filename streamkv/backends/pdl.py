"""Programmatic dependent launch (PDL, sm_90+) for the captured decode step's Triton kernels.

A kernel launched with PDL (`launch_pdl=True`) may start while the kernel before it on its stream is still
running: its programs are placed on the SMs as the previous kernel's programs retire, instead of after the
whole previous grid has drained and the next launch has gone through the front end. Inside, `pdl_enter`
lets the next kernel launch in turn, then waits (`griddepcontrol.wait`) until the previous kernel has
finished and its writes are visible; every read or write of global memory comes after it.

Why it is safe in a chain: each PDL kernel waits, in every program, before it touches anything, so it
completes only after its predecessor completed, which completed only after its own predecessor, and so on.
A kernel launched without PDL waits for its predecessor as usual. Captured into a CUDA graph the launch
attribute becomes a programmatic edge (CUDA >= 12.3).

The Triton interpreter has no inline assembly: PDL is off there and on the CPU (`pdl_supported`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def pdl_supported(device) -> bool:
    """PDL needs an NVIDIA GPU of compute capability 9.0 or newer (Hopper), compiled kernels (not Triton's
    interpreter) and CUDA, not ROCm (whose MI300 also reports a major version 9). Asked once per decode step
    (un-captured steps too): the device query is cached."""
    return (device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
            and _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9)


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (no-op when PDL is off)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
