"""The benchmark's driver: `python -m streamkv.bench` (flags: --help). One BenchRun per call of main()
holds its options and what it has measured so far; the results are rewritten after every case."""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamkv import bench
from streamkv.backends.graph import GemvOptions
from streamkv.bench import baselines  # called through the module: tests wrap its functions
from streamkv.bench.cases import Case, default_cases
from streamkv.bench.measure import alive_blocks, copy_bandwidth, device_name, left_resident
from streamkv.bench.ours import run_ours
from streamkv.bench.report import Row, markdown, write_results
from streamkv.bench.shapes import bench_dtype, bench_ids, kv_bytes_per_token, load_bench_model, weight_bytes
from streamkv.cache import CACHES


@dataclass
class BenchRun:
    """One benchmark (one call of main(); tests call it several times in one process)."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype  # the default; bench_dtype picks a model's own (GPT-NeoX: float16 on CUDA)
    bw: float  # bytes/s of a device-to-device copy, read + write (the roofline's denominator)
    out_dir: Path
    gemv: GemvOptions | None = None  # cudagraph_fused_gemv's GemvOptions (--gemv-max-mb); None: their defaults
    meta: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # every finished Row of every model so far

    def write(self) -> None:
        write_results(self.out_dir, self.rows, self.meta)


def run_case(run: BenchRun, name: str, case: Case, model, tokenizer, dtype) -> Row:
    """Time one path on the loaded model; a failure is recorded in the row, not raised."""
    args, device = run.args, run.device
    n_sink, window = args.n_sink, args.window
    prefill = n_sink + window
    total_w, read_w = weight_bytes(model)
    kv_tok = kv_bytes_per_token(model)
    slow = case.kind != "ours" or case.backend in ("eager", "compile", "fused")
    # our slow paths decode 4 more: the PPL column compares decode steps 4 .. 4 + decode_slow everywhere
    decode = case.decode or ((args.decode_slow + (4 if case.kind == "ours" else 0)) if slow else args.decode)
    row = Row(model=name, label=case.label, cache=case.cache if case.kind == "ours" else "-",
              backend=case.backend if case.kind == "ours" else "-", policy=case.policy_name if case.kind != "hf_static"
              else "full (dense)", R=case.R if case.kind != "hf_static" else 0,
              weights_mb=total_w / 2**20)
    t_case = time.perf_counter()
    if device.type == "cuda":
        row.resident_before_mb = torch.cuda.memory_allocated(device) / 2**20
    alive_before = alive_blocks(device) if args.memory_history and device.type == "cuda" else None
    k = args.profile_steps if case.profile and args.profile_steps else 0
    try:
        ids = bench_ids(prefill + max(decode, case.R) + 8 + k + 2, model.config.vocab_size, tokenizer).to(device)
        if case.kind == "seed":
            # HF's SDPA may pick cuDNN, which builds a plan per new key length (~40 ms each on an H100):
            # a discarded pass over one whole prune cycle first, so the timed steps are the steady state
            baselines.hf_seed_style(model, ids, prefill, case.R, n_sink, window, case.R)
            res = baselines.hf_seed_style(model, ids, prefill, decode, n_sink, window, case.R, profile_steps=k)
            row.ttft_ms = res["prefill_ms"]
        elif case.kind == "hf_static":
            res = baselines.hf_static_compile(model, ids, prefill, decode, profile_steps=k,
                                              mode=args.hf_compile_mode)
            row.ttft_ms = res["prefill_ms"]
            row.kv_capacity_slots = res["max_cache_len"]
            row.kv_capacity_mb = res["max_cache_len"] * kv_tok / 2**20
        else:
            ids = ids[:prefill + decode + 1]
            res = run_ours(case, model, tokenizer, ids, prefill, device, dtype, n_sink, window, profile_steps=k,
                           gemv=run.gemv)
            row.ttft_ms = res["ttft_ms"]
            row.backend_used = res["backend_used"]
            mem = res.get("memory") or {}
            if "kv_cache_bytes" in mem:
                row.kv_capacity_mb = mem["kv_cache_bytes"] / 2**20
                row.kv_capacity_slots = mem["kv_capacity_slots"]
            if "schedule_and_buffers_bytes" in mem:
                row.schedule_mb = mem["schedule_and_buffers_bytes"] / 2**20
        row.prefill_tokens = prefill
        row.decode_tokens = res["decode_tokens"]
        row.prefill_ms = res["prefill_ms"]
        row.tpot_ms = res["decode_ms"] / res["decode_tokens"]
        row.peak_mem_mb = res["peak_mem_mb"]
        row.peak_mem_all_mb = res.get("peak_mem_all_mb", res["peak_mem_mb"])
        if not math.isnan(row.kv_capacity_mb):  # against what was resident before the case (the weights
            # and whatever earlier cases of this process left, e.g. cuBLAS workspaces per stream)
            base = row.weights_mb if math.isnan(row.resident_before_mb) else row.resident_before_mb
            row.other_mb = row.peak_mem_mb - base - row.kv_capacity_mb - \
                (0.0 if math.isnan(row.schedule_mb) else row.schedule_mb)
        row.visible_kv_mean = res["visible_kv_mean"]
        row.n_prunes = res.get("n_prunes", -1)
        row.roofline_ms = (read_w + row.visible_kv_mean * kv_tok) / run.bw * 1e3
        row.roofline_frac = row.roofline_ms / row.tpot_ms
        nll = res["nll"]
        if case.kind == "ours":  # the baselines score decode steps 4 .. 4 + decode_slow (after their warm-up)
            row.ppl_all = float(math.exp(float(np.mean(nll))))
            nll = nll[4:4 + args.decode_slow]
        row.ppl = float(math.exp(float(np.mean(nll))))
        row.profile = {key: v for key, v in res.get("profile", {}).items() if key != "by_name"}
    except Exception as exc:  # one failing path must not lose the others' numbers
        row.status = "failed"
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        traceback.print_exc()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if alive_before is not None:
            row.left_resident = left_resident(alive_before, alive_blocks(device))
            for e in row.left_resident:
                print(f"[{name}]   left resident {e['mb']:7.1f} MB  {e['where']}", flush=True)
    print(f"[{name}] {row.label:42s} {row.policy:24s} R={row.R:<3d} TPOT {row.tpot_ms:8.3f} ms  "
          f"peak {row.peak_mem_mb:8.1f} MB  roofline {row.roofline_frac * 100:5.1f}%  PPL {row.ppl:8.3f}  "
          f"[{row.status}{' ' + row.error if row.error else ''}] ({time.perf_counter() - t_case:.1f}s)", flush=True)
    return row


def run_model(name: str, run: BenchRun) -> list[Row]:
    """Every case of one model (--only filters them by label); each row joins run.rows as it finishes."""
    dtype = bench_dtype(name, run.device, run.dtype)  # GPT-NeoX (Pythia): float16 on CUDA
    run.meta.setdefault("model_dtypes", {})[name] = str(dtype).replace("torch.", "")
    t_load = time.perf_counter()
    model, tokenizer, info = load_bench_model(name, run.device, dtype)
    print(f"[{name}] loaded in {time.perf_counter() - t_load:.1f}s ({info['weights']})", flush=True)
    rows = []
    for case in default_cases(name, run.args.smoke, set(CACHES)):
        if run.args.only and not any(s in f"{case.label} {case.policy_name} R={case.R}" for s in run.args.only):
            continue
        rows.append(run_case(run, name, case, model, tokenizer, dtype))
        run.rows.append(rows[-1])
        run.write()
    del model
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _dtypes(models, device, dtype) -> str:
    return ", ".join(sorted({str(bench_dtype(m, device, dtype)).replace("torch.", "") for m in models}))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamkv.bench", description=bench.__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random Llama, small window: checks the plumbing")
    ap.add_argument("--models", default=None, help="comma list of smollm2, smollm2-shape (random weights), llama-1.1b, llama-7b, pythia-2.8b (random "
                    "GPT-NeoX, float16) (default: smollm2, llama-1.1b, llama-7b)")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=1024, help="decode steps timed for the fast paths")
    ap.add_argument("--decode-slow", type=int, default=128, help="decode steps for eager paths and baselines")
    ap.add_argument("--profile-steps", type=int, default=16, help="decode steps under torch.profiler (0: none)")
    ap.add_argument("--hf-compile-mode", default="reduce-overhead")
    ap.add_argument("--only", nargs="*", default=None, help="run only cases whose label contains one of these")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gemv-configs", metavar="JSON", help="cudagraph_fused_gemv: launch configs tuned by "
                    "scripts/gemv_bench.py (its --out), added to gemv_kernels.MEASURED for this run")
    ap.add_argument("--gemv-max-mb", type=float, default=None, help="cudagraph_fused_gemv: fuse GEMVs with "
                    "weights up to this many MiB (default: GemvOptions.max_bytes, 4; 0 = no limit)")
    ap.add_argument("--no-pdl", action="store_true", help="cudagraph_fused_gemv (GPT-NeoX): launch without "
                    "programmatic dependent launch (GemvOptions.pdl), to compare")
    ap.add_argument("--memory-history", action="store_true", help="CUDA: record allocation call sites and list, "
                    "per case, what it left allocated (the process's one-time overheads)")
    ap.add_argument("--out", default="bench-out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device = torch.device(args.device or "cpu")
        dtype = torch.float32
        models = args.models.split(",") if args.models else ["tiny"]  # tiny, tiny-neox
        args.window, args.decode, args.decode_slow = min(args.window, 64), min(args.decode, 24), min(args.decode_slow, 12)
        args.profile_steps = min(args.profile_steps, 4)
        args.hf_compile_mode = "default"
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        models = args.models.split(",") if args.models else ["smollm2", "llama-1.1b", "llama-7b"]
    gemv_meta = {}
    if args.gemv_configs:
        from streamkv.backends import gemv_kernels

        added = gemv_kernels.load_measured(args.gemv_configs)
        gemv_meta["gemv_configs_added"] = {f"{n}x{k}": list(c) for (n, k), c in added.items()}
        print(f"gemv configs from {args.gemv_configs}: {gemv_meta['gemv_configs_added']}", flush=True)
    options = {"pdl": not args.no_pdl}  # GPT-NeoX's GEMV step on sm_90+ (streamkv/backends/pdl.py)
    if args.gemv_max_mb is not None:
        options["max_bytes"] = gemv_meta["gemv_max_bytes"] = \
            None if args.gemv_max_mb == 0 else int(args.gemv_max_mb * 2**20)
    gemv = GemvOptions(**options)
    gemv_meta["pdl"] = gemv.pdl
    if args.memory_history and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    import transformers

    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    run = BenchRun(args, device, dtype, bw, Path(args.out), gemv=gemv)
    run.meta.update({"device": device_name(device), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0],
                     "copy_bw_gbs": bw / 1e9, "n_sink": args.n_sink, "window": args.window,
                     "dtype": _dtypes(models, device, dtype), "decode": args.decode, "decode_slow": args.decode_slow,
                     "hf_compile_mode": args.hf_compile_mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     **gemv_meta})
    print(f"device: {run.meta['device']}  copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    for name in models:
        run_model(name, run)
        run.write()
    print()
    print(markdown(run.rows, run.meta))
    return 0 if all(r.status == "ok" for r in run.rows) else 1
