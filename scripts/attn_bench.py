"""GPU microbenchmark of the decode attention (streamkv/backends/triton_kernels.py: `DecodeAttention`):
the parts kernel (tensor-core dots over the query heads of a KV head, the head dim in rotary / pass-through
parts) against the rows kernel (one query head per program, whole rows on CUDA cores), on the model
shapes of the bench, keys stored rotated (ring layout) and rotated at read (static layout). One CUDA
graph of `--reps` calls over distinct K/V copies (more bytes than L2 holds, as the step reads each
layer's cache once), timed with CUDA events; also the error of each against a float64 reference.

    python scripts/attn_bench.py --out attn.json          # ~1 min on an H200
    python scripts/attn_bench.py --tune --models pythia-2.8b --out tune.json   # launch shapes, ring layout
    TRITON_INTERPRET=1 python scripts/attn_bench.py --smoke   # CPU: the plumbing, timings meaningless

--tune times each kernel's launch shapes (`DecodeAttention`'s block_n, waves, num_warps) on the ring
layout and lists the fastest per shape and kernel, the defaults' row marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemv_bench import time_graph  # noqa: E402  (scripts/ is the script's own directory)

from streamkv.backends.functional import rope  # noqa: E402
from streamkv.backends.triton_kernels import DecodeAttention  # noqa: E402
from streamkv.decoder import RotaryTable  # noqa: E402

# name: (n_heads, n_kv_heads, head_dim, rotary_dim, dtype); capacity = n_sink 4 + window 2048 + R 32
SHAPES = {"pythia-2.8b": (32, 32, 80, 20, torch.float16),
          "llama-7b": (32, 32, 128, 128, torch.bfloat16),
          "smollm2": (9, 3, 64, 64, torch.bfloat16)}
SMOKE = {"tiny-neox": (3, 3, 80, 20, torch.float32)}


def tables(n: int, rot: int, dev, dt):
    """cos/sin [n, rot] as the decode step's (base 10000)."""
    t = RotaryTable(1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=dev) / rot), 1.0, n, dt)
    return t.cos, t.sin


# --tune: (block_n, waves, num_warps) per kernel; the parts kernel's tensor-core dots need block_n >= 16
TUNE_GRID = {"rows": [(b, w, n) for b in (16, 32, 64, 128) for w in (2, 4, 8, 16) for n in (1, 2, 4, 8)],
             "parts": [(b, w, n) for b in (16, 32, 64) for w in (1, 2, 4, 8) for n in (2, 4, 8)]}
SMOKE_GRID = {"rows": [(16, 2, 1), (32, 4, 2)], "parts": [(16, 2, 4)]}


def inputs(shape, C, dev, reps, cache_mb):
    """A query, K/V copies of one layer's C + 1 slots (as many as fill cache_mb, at most reps: more bytes
    than L2 holds), a valid mask (~10 % holes, the scratch slot C invalid), and one copy's bytes."""
    Hq, Hkv, D, rot, dt = shape
    per_copy = 2 * Hkv * (C + 1) * D * torch.finfo(dt).bits // 8
    n_copies = max(1, min(reps, -(-cache_mb * 2**20 // per_copy)))
    torch.manual_seed(0)
    q = torch.randn(Hq, D, device=dev, dtype=dt)
    ks = [torch.randn(Hkv, C + 1, D, device=dev, dtype=dt) for _ in range(n_copies)]
    vs = [torch.randn(Hkv, C + 1, D, device=dev, dtype=dt) for _ in range(n_copies)]
    valid = torch.rand(C + 1, device=dev) > 0.1
    valid[C] = False
    return q, ks, vs, valid, per_copy


def tune_shape(name, shape, C, dev, reps, cache_mb, grid) -> list[dict]:
    """Every launch shape of `grid` for both kernels, keys stored rotated (ring layout): us per layer and
    the error against a float64 reference; the defaults' row has `default` = True."""
    Hq, Hkv, D, rot, dt = shape
    q, ks, vs, valid, per_copy = inputs(shape, C, dev, reps, cache_mb)
    n_copies = len(ks)
    s = (q.double().view(Hkv, Hq // Hkv, D) @ ks[0][:, :C].double().transpose(1, 2)) * D ** -0.5
    ref = (s.masked_fill(~valid[:C], float("-inf")).softmax(-1) @ vs[0][:, :C].double()).reshape(Hq, D)
    out = []
    for kernel, shapes in grid.items():
        default = DecodeAttention(Hq, Hkv, D, C, dev, dt, rotary_dim=rot, rows=kernel == "rows")
        for block_n, waves, warps in shapes:
            att = DecodeAttention(Hq, Hkv, D, C, dev, dt, rotary_dim=rot, rows=kernel == "rows", block_n=block_n,
                                  waves=waves, num_warps=warps)
            err = float((att(q, ks[0], vs[0], valid, D ** -0.5).double() - ref).norm() / ref.norm())
            us = time_graph(lambda i: att(q, ks[i], vs[i], valid, D ** -0.5), n_copies, reps)
            out.append({"shape": name, "kernel": kernel, "block_n": block_n, "waves": waves, "num_warps": warps,
                        "splits": att.ns, "us_per_layer": round(us, 2), "gb_s": round(per_copy / us / 1e3, 1),
                        "rel_err": err, "default": (block_n, waves, warps) == (default.block_n, default.waves,
                                                                                default.num_warps)})
        best = sorted((r for r in out if r["kernel"] == kernel), key=lambda r: r["us_per_layer"])
        for r in best[:5] + [r for r in best[5:] if r["default"]]:
            print(f"{name:12s} {kernel:5s} block_n={r['block_n']:3d} waves={r['waves']:2d} warps={r['num_warps']} "
                  f"splits={r['splits']:3d} {r['us_per_layer']:8.2f} us {r['gb_s']:7.1f} GB/s err={r['rel_err']:.1e}"
                  + ("  (default)" if r["default"] else ""), flush=True)
    return out


def bench_shape(name, shape, C, dev, reps, cache_mb) -> list[dict]:
    Hq, Hkv, D, rot, dt = shape
    q, ks, vs, valid, per_copy = inputs(shape, C, dev, reps, cache_mb)
    n_copies = len(ks)
    cos, sin = tables(C + 1, rot, dev, dt)
    rows_out = []
    for rotate in (False, True):
        kk = rope(ks[0][:, :C].double(), cos[:C].double(), sin[:C].double()) if rotate else ks[0][:, :C].double()
        s = (q.double().view(Hkv, Hq // Hkv, D) @ kk.transpose(1, 2)) * D ** -0.5
        ref = (s.masked_fill(~valid[:C], float("-inf")).softmax(-1) @ vs[0][:, :C].double()).reshape(Hq, D)
        for rows in (False, True):
            att = DecodeAttention(Hq, Hkv, D, C, dev, dt, rotate_k=rotate, rotary_dim=rot, rows=rows)
            cs = (cos, sin) if rotate else (None, None)
            err = float((att(q, ks[0], vs[0], valid, D ** -0.5, *cs).double() - ref).norm() / ref.norm())
            us = time_graph(lambda i: att(q, ks[i], vs[i], valid, D ** -0.5, *cs), n_copies, reps)
            rows_out.append({"shape": name, "layout": "static (rotate at read)" if rotate else "ring (stored rotated)",
                             "kernel": "rows" if rows else "parts",
                             "splits": att.ns, "block_n": att.block_n, "us_per_layer": round(us, 2),
                             "kv_mb": round(per_copy / 2**20, 2), "gb_s": round(per_copy / us / 1e3, 1),
                             "rel_err": err})
            print(f"{name:12s} {rows_out[-1]['layout']:24s} {rows_out[-1]['kernel']:5s} splits={att.ns:3d} "
                  f"{us:8.2f} us  {rows_out[-1]['gb_s']:7.1f} GB/s  err={err:.1e}", flush=True)
    return rows_out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", nargs="*", default=list(SHAPES))
    ap.add_argument("--capacity", type=int, default=4 + 2048 + 32)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--cache-mb", type=int, default=512, help="K/V copies cycled through (beyond L2)")
    ap.add_argument("--smoke", action="store_true", help="CPU (TRITON_INTERPRET=1): tiny shape, capacity 70")
    ap.add_argument("--tune", action="store_true", help="time the launch shapes (ring layout) instead")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE if args.smoke else {m: SHAPES[m] for m in args.models}
    C = 70 if args.smoke else args.capacity
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "capacity": C, "rows": []}
    print("device:", report["device"], "torch", report["torch"], flush=True)
    for name, shape in shapes.items():
        reps, cache_mb = (2, 1) if args.smoke else (args.reps, args.cache_mb)
        if args.tune:
            report["rows"] += tune_shape(name, shape, C, dev, reps, cache_mb, SMOKE_GRID if args.smoke else TUNE_GRID)
        else:
            report["rows"] += bench_shape(name, shape, C, dev, reps, cache_mb)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    tol = 1e-5 if args.smoke else 1e-2
    return 0 if all(r["rel_err"] < tol for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
