"""What the benchmark measures besides wall time: the device, its copy bandwidth (the roofline's
denominator), kernel profiles (torch.profiler) and, with --memory-history, what a case left allocated."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from streamkv.timing import sync


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / float(np.median(times))


# ---------------------------------------------------------------- profiling


def kernel_profile(step, n_steps: int, device: torch.device, trace_path: Path | None = None) -> dict:
    """Run `step()` n_steps times under torch.profiler: GPU kernels per token, GPU-busy time per token,
    wall time per token, and the kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    path = trace_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"streamkv-trace-{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    if trace_path is None:
        path.unlink(missing_ok=True)
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_name: dict = {}
    for e in kernels:
        name = e.get("name", "?")[:90]
        c, d = by_name.get(name, (0, 0.0))
        by_name[name] = (c + 1, d + float(e.get("dur", 0.0)))
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    api = [e.get("name", "") for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = sum(1 for n in api if n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                           "cudaLaunchKernelExC"))  # Triton launches through the driver API
    graph_launches = sum(1 for n in api if "GraphLaunch" in n)
    return {
        "steps": n_steps,
        "kernels_per_token": len(kernels) / n_steps,
        "host_launches_per_token": launches / n_steps,
        "graph_launches_per_token": graph_launches / n_steps,
        "gpu_busy_ms_per_token": sum(float(e.get("dur", 0.0)) for e in kernels) / 1e3 / n_steps,
        "wall_ms_per_token_profiled": wall * 1e3 / n_steps,
        "top_kernels": [{"name": n, "count_per_token": c / n_steps, "ms_per_token": d / 1e3 / n_steps}
                        for n, (c, d) in top],
        "by_name": by_name,
    }


def profile_delta(full: dict, pre: dict, k: int) -> dict:
    """Per decoded token of (a profiled run that decodes k tokens) - (the same run without them): our
    evaluators profile whole runs, so the prefill is subtracted out."""
    out = {"steps": k}
    for key in ("kernels_per_token", "host_launches_per_token", "graph_launches_per_token",
                "gpu_busy_ms_per_token", "wall_ms_per_token_profiled"):
        out[key] = (full[key] - pre[key]) / k
    diff = {name: (c - pre["by_name"].get(name, (0, 0.0))[0], d - pre["by_name"].get(name, (0, 0.0))[1])
            for name, (c, d) in full["by_name"].items()}
    out["top_kernels"] = [{"name": n, "count_per_token": c / k, "ms_per_token": d / 1e3 / k}
                          for n, (c, d) in sorted(diff.items(), key=lambda kv: -kv[1][1])[:12]]
    return out


# ---------------------------------------------------------------- memory bookkeeping (--memory-history)


def alive_blocks(device) -> dict:
    """address -> (bytes, where) of every live allocation (where: call sites, when history is recorded)."""
    out = {}
    for seg in torch.cuda.memory._snapshot(device)["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames = b.get("frames") or []
                ours = [f for f in frames if "streamkv" in f["filename"]][:2]
                where = " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}"
                                   for f in (frames[:1] + ours)) or "?"
                out[b["address"]] = (b["size"], where)
    return out


def left_resident(before: dict, after: dict, top: int = 8) -> list[dict]:
    """Allocations alive after a case that were not before it, grouped by call site (largest first)."""
    by_where: dict = {}
    for addr, (size, where) in after.items():
        if addr not in before:
            by_where[where] = by_where.get(where, 0) + size
    return [{"mb": v / 2**20, "where": k} for k, v in sorted(by_where.items(), key=lambda kv: -kv[1])[:top]]
