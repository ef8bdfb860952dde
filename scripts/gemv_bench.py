"""GPU microbenchmark of the fused-prologue decode GEMVs (streamkv/backends/gemv_kernels.py) against
the path they replace, one activation row, bf16 weights [N, K] (pythia-2.8b: float16, its GEMVs plain),
one CUDA graph of `--reps` calls over distinct weight copies (enough copies that they do not fit in L2:
the real step reads every layer's weights once), timed with CUDA events:

  (a) liger fused add + RMSNorm, then cuBLAS F.linear      vs  (b) add_rmsnorm_gemv
  (c) liger SwiGLU, then cuBLAS F.linear (down)            vs  (d) swiglu_gemv
  plus the bare GEMVs: cuBLAS F.linear vs our kernel without prologue (how good the GEMV core is)

for SmolLM2-135M, TinyLlama-1.1B and Llama-2-7B shapes (qkv and gate/up after a norm, the LM head
after the final norm, down after SwiGLU). Our kernels run with the shape heuristic's config
(`gemv_config`, what the decode step uses) and, for a sweep, with its neighbours; the table says
which config was fastest, so that the heuristic can be corrected from one run. Also reports the
max error of each fused output against the unfused one (relative to max |unfused|).

    python scripts/gemv_bench.py --out gemv.json                 # ~1-2 min on an H100
    python scripts/gemv_bench.py --out gemv.json --no-sweep      # heuristic configs only
    python scripts/gemv_bench.py --models llama-7b --sweep-models llama-7b --rounds 4 --budget-s 300 --out g.json
        # hill-climb 7B's configs (each round re-centres the neighbourhood on the best so far); then
        # python -m streamkv.bench --models llama-7b --gemv-configs g.json --gemv-max-mb 0 ... times them end to end
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamkv.backends.gemv_kernels import _n_sm, add_rmsnorm_gemv, gemv, gemv_config, swiglu_gemv  # noqa: E402

# name: (hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab)
MODELS = {"smollm2": (576, 1536, 9, 3, 64, 49152),
          "llama-1.1b": (2048, 5632, 32, 4, 64, 32000),
          "llama-7b": (4096, 11008, 32, 32, 128, 32000),
          # GPT-NeoX (no norm or SwiGLU prologue here: its four GEMVs and the LM head as plain GEMVs, float16)
          "pythia-2.8b": (2560, 10240, 32, 32, 80, 50304)}
NEOX = {"pythia-2.8b"}
# --smoke (CPU, TRITON_INTERPRET=1): the script's plumbing on tiny shapes, timings meaningless
SMOKE = {"tiny": (96, 160, 3, 1, 32, 300)}
EPS = 1e-5


def liger():
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
        return LigerFusedAddRMSNormFunction, LigerFusedGateUpSiLUMulFunction
    except ImportError:  # torch ops instead (more launches): the numbers say so
        return None, None


def time_graph(fn, n_copies: int, reps: int, iters: int = 5) -> float:
    """us per call of fn(i) (i: the weight copy), `reps` calls captured in one CUDA graph."""
    if not torch.cuda.is_available():  # --smoke
        t0 = time.perf_counter()
        for i in range(2):
            fn(i % n_copies)
        return (time.perf_counter() - t0) / 2 * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(n_copies, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i % n_copies)
    g.replay()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    del g
    return best


def neighbours(cfg, N, K):
    bn, bk, nw = cfg
    kmax = 1 << max(4, (K - 1).bit_length())
    out = [cfg]
    for c in [(bn * 2, bk, nw), (bn // 2, bk, nw), (bn, bk * 2, nw), (bn, bk // 2, nw), (bn, bk, nw * 2),
              (bn, bk, nw // 2), (bn * 2, bk, nw * 2), (bn, bk * 2, nw * 2)]:
        if c[0] >= 1 and 16 <= c[1] <= min(kmax, 1024) and 1 <= c[2] <= 8 and c[0] <= 64 and c not in out:
            out.append(c)
    return out


def relerr(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemv_bench.json")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=100, help="calls per CUDA graph")
    ap.add_argument("--l2-bytes", type=float, default=150e6, help="weight copies until this many bytes (> L2)")
    ap.add_argument("--no-sweep", action="store_true", help="only the heuristic config (and exact=False)")
    ap.add_argument("--sweep-models", default="smollm2", help="models whose shapes get the config sweep "
                    "('all' for every model)")
    ap.add_argument("--budget-s", type=float, default=70.0, help="stop sweeping after this many seconds")
    ap.add_argument("--rounds", type=int, default=1, help="neighbourhood sweeps per shape, each centred on the "
                    "best config so far (1: the heuristic's neighbours only)")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes: plumbing only")
    args = ap.parse_args(argv)
    models = SMOKE if args.smoke else MODELS
    if args.smoke:
        args.models, args.sweep_models, args.reps, args.l2_bytes = "tiny", "tiny", 2, 1
    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    # smoke: torch ops as the baseline (liger's kernels fail in Triton's interpreter: a float `.to` in its norm)
    AddNorm, SwiGLU = (None, None) if args.smoke else liger()
    n_sm = _n_sm(dev)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "n_sm": n_sm, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "liger": AddNorm is not None, "reps": args.reps}
    print(f"device: {meta['device']} ({n_sm} SMs), torch {meta['torch']}, triton {meta['triton']}, "
          f"liger {'yes' if AddNorm else 'NO (torch ops as baseline)'}", flush=True)
    t_start = time.perf_counter()
    rows = []

    def save():
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    sweep_models = set(models) if args.sweep_models == "all" else set(args.sweep_models.split(","))
    for model in args.models.split(","):
        hidden, inter, H, Hkv, D, vocab = models[model]
        shapes = [("qkv", "norm", (H + 2 * Hkv) * D, hidden), ("gate_up", "norm", 2 * inter, hidden),
                  ("lm_head", "norm", vocab, hidden), ("down", "swiglu", hidden, inter),
                  ("o_proj", "plain", hidden, H * D)]
        dt = torch.bfloat16
        if model in NEOX:
            shapes = [("query_key_value", "plain", 3 * H * D, hidden), ("dense", "plain", hidden, H * D),
                      ("dense_h_to_4h", "plain", inter, hidden), ("dense_4h_to_h", "plain", hidden, inter),
                      ("embed_out", "plain", vocab, hidden)]
            dt = torch.float16
        for name, kind, N, K in shapes:
            wbytes = N * K * 2
            n_copies = max(1, min(args.reps, math.ceil(args.l2_bytes / wbytes)))
            Ws = [torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(n_copies)]
            gamma = (torch.rand(K, device=dev) + 0.5).to(dt)
            x = torch.randn(1, K, device=dev, dtype=dt)
            r = torch.randn(1, K, device=dev, dtype=dt)
            gu = torch.randn(1, 2 * K, device=dev, dtype=dt)
            act_bytes = ({"norm": 4 * K, "swiglu": 2 * K, "plain": K}[kind] + N) * 2  # x, r, gamma, s; y
            heur = gemv_config(N, K, n_sm)
            row = {"model": model, "gemv": name, "kind": kind, "N": N, "K": K, "weight_mb": wbytes / 2**20,
                   "copies": n_copies, "heuristic": list(heur)}

            if kind == "norm":
                if AddNorm is not None:
                    def unfused(i):
                        h, s = AddNorm.apply(x, r, gamma, EPS, 0.0, "llama", False)
                        return F.linear(h, Ws[i]), s
                else:
                    def unfused(i):
                        s = x + r
                        sf = s.float()
                        h = gamma * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + EPS)).to(s.dtype)
                        return F.linear(h, Ws[i]), s

                def ours(i, cfg=None, exact=True):
                    return add_rmsnorm_gemv(x, r, gamma, Ws[i], EPS, exact=exact, config=cfg)
            elif kind == "swiglu":
                if SwiGLU is not None:
                    def unfused(i):
                        return F.linear(SwiGLU.apply(gu), Ws[i]), None
                else:
                    def unfused(i):
                        g, u = gu.chunk(2, -1)
                        return F.linear(F.silu(g) * u, Ws[i]), None

                def ours(i, cfg=None, exact=True):
                    return swiglu_gemv(gu, Ws[i], config=cfg), None
            else:
                def unfused(i):
                    return F.linear(x, Ws[i]), None

                def ours(i, cfg=None, exact=True):
                    return gemv(x, Ws[i], config=cfg), None

            ref, sref = unfused(0)
            row["unfused_us"] = time_graph(unfused, n_copies, args.reps)
            if kind != "plain":
                row["cublas_only_us"] = time_graph(lambda i: F.linear(x, Ws[i]), n_copies, args.reps)
                row["ours_plain_us"] = time_graph(lambda i: gemv(x, Ws[i]), n_copies, args.reps)
            y, s = ours(0)
            row["err_vs_unfused"] = relerr(y, ref)
            if s is not None and sref is not None:
                row["residual_equal"] = bool(torch.equal(s, sref))
            row["ours_us"] = time_graph(ours, n_copies, args.reps)
            if kind == "norm":
                y1, _ = ours(0, exact=False)
                row["err_one_pass"] = relerr(y1, ref)
                row["ours_one_pass_us"] = time_graph(lambda i: ours(i, exact=False), n_copies, args.reps)
            sweep = {}
            best_cfg, best_us = list(heur), row["ours_us"]
            centre = tuple(heur)
            for _ in range(args.rounds if not args.no_sweep and model in sweep_models else 0):
                for cfg in neighbours(centre, N, K)[1:]:
                    if str(list(cfg)) in sweep:
                        continue
                    if time.perf_counter() - t_start > args.budget_s:
                        row["sweep_cut"] = True
                        break
                    try:
                        yc, _ = ours(0, cfg)
                        e = relerr(yc, ref)
                        sweep[str(list(cfg))] = {"us": time_graph(lambda i: ours(i, cfg), n_copies, args.reps),
                                                 "err": e}
                    except Exception as exc:  # e.g. out of resources
                        sweep[str(list(cfg))] = {"us": math.inf, "err": math.nan, "error": str(exc)[:200]}
                for c, v in sweep.items():
                    if v["us"] < best_us:
                        best_cfg, best_us = json.loads(c), v["us"]
                if tuple(best_cfg) == centre or row.get("sweep_cut"):
                    break  # a local optimum (or out of time)
                centre = tuple(best_cfg)
            row["sweep"] = sweep
            row["best_cfg"], row["best_us"] = best_cfg, best_us
            for k in ("unfused_us", "ours_us", "best_us", "cublas_only_us", "ours_plain_us", "ours_one_pass_us"):
                if k in row:
                    row[k.replace("_us", "_gbs")] = (wbytes + act_bytes) / (row[k] * 1e-6) / 1e9
            rows.append(row)
            save()
            extra = ""
            if kind != "plain":
                extra = (f" | bare: cuBLAS {row['cublas_only_us']:6.2f} ours {row['ours_plain_us']:6.2f}")
            if kind == "norm":
                extra += f" | one-pass {row['ours_one_pass_us']:6.2f} (err {row['err_one_pass']:.1e})"
            print(f"{model:10s} {name:8s} N={N:6d} K={K:6d} {wbytes / 2**20:7.2f} MB x{n_copies:<3d} "
                  f"unfused {row['unfused_us']:7.2f} us ({row['unfused_gbs']:6.0f} GB/s)  "
                  f"ours {row['ours_us']:7.2f} us ({row['ours_gbs']:6.0f} GB/s) cfg {tuple(heur)}  "
                  f"best {row['best_us']:7.2f} {tuple(best_cfg)}  err {row['err_vs_unfused']:.1e}{extra}",
                  flush=True)
            del Ws
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    meta["seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {args.out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
