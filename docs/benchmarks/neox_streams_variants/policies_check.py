"""The fused GPT-NeoX steps (cudagraph_fused, cudagraph_fused_gemv) against the PyTorch graph step (cudagraph), per
policy and cache layout: a random 4-layer GPT-NeoX with Pythia's layer layout (hidden 640, parallel residual), float32,
captured on CUDA, 3000 tokens, n_sink 4 + window 256, R = 16 (adaptive: R = 1, its slack rule). Writes per-token
mean / max |dNLL| as JSON. From the project root:  python docs/benchmarks/neox_streams_variants/policies_check.py OUT.json
(POLS=a,b and CACHES=ring|static restrict it; DEV=cpu NTOK=300 runs the cudagraph step alone, un-captured: a smoke run)."""
import math, sys, json
import numpy as np, torch
sys.path.insert(0, "scripts")
from gpu_check import neox_model
from streamkv.bench import bench_ids, compose_run
from streamkv.validate import validate
from streamkv.runner import make_evaluator
from streamkv.backends.graph import GemvOptions

import os
dev = torch.device(os.environ.get("DEV", "cuda"))
cap = [] if dev.type == "cuda" else ["backend.capture=false"]
BACKENDS = ("cudagraph", "cudagraph_fused", "cudagraph_fused_gemv") if dev.type == "cuda" else ("cudagraph",)
n_sink, window, R = 4, 256, 16
prefill = n_sink + window
ids = bench_ids(int(os.environ.get("NTOK", 3000)), 50304, None).to(dev)
model = neox_model(torch.float32, 4, 640, 8, 50304, dev)
out = []
for pol, extra in [("streaming", []), ("snapkv", []), ("tova", []), ("h2o", []), ("refresh", []),
                   ("max_drop", []), ("adaptive", [])]:
    if pol not in os.environ.get("POLS", pol).split(","):
        continue
    for cache in os.environ.get("CACHES", "ring,static").split(","):
        nll = {}
        for backend in BACKENDS:
            try:
                cfg = compose_run(["model=tiny_neox", f"cache={cache}", f"backend={backend}", f"policy={pol}",
                                   f"n_sink={n_sink}", f"window={window}", f"compress_every={1 if pol == 'adaptive' else R}",
                                   f"prefill_tokens={prefill}", f"device={dev}", "dtype=float32", "progress=false", *cap, *extra])
                validate(cfg)
                ev = make_evaluator(cfg, model, len(ids), dev)
                if backend == "cudagraph_fused_gemv":
                    ev.gemv = GemvOptions(max_bytes=None)
                ev.warm_up(ids, prefill, 4)
                r = ev.run(ids, prefill)
                nll[backend] = (r.nll.astype(np.float64), getattr(ev, "backend_used", backend))
            except Exception as exc:
                print(pol, cache, backend, "ERR", type(exc).__name__, str(exc)[:200], flush=True)
        if "cudagraph" in nll:
            for b in ("cudagraph_fused", "cudagraph_fused_gemv"):
                if b in nll:
                    d = np.abs(nll["cudagraph"][0] - nll[b][0])
                    row = {"policy": pol, "cache": cache, "backend": b, "used": nll[b][1],
                           "mean_abs_dnll": float(np.nanmean(d)), "max_abs_dnll": float(np.nanmax(d))}
                    out.append(row); print(row, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
