# kv_update in head blocks (kv_update_head_blocks.diff applied) against one program and against the PyTorch step:
# per-token NLL of a random GPT-NeoX with Pythia's layer layout, ring, streaming R = 32, uncaptured.
# Run from the project root on a GPU: python docs/benchmarks/neox_pdl/kv_update_head_blocks_check.py HIDDEN LAYERS DTYPE
import functools, sys
import numpy as np, torch
sys.path.insert(0, "scripts")
from gpu_check import neox_model
from streamkv.backends.graph import GemvOptions
from streamkv.bench import bench_ids, compose_run
from streamkv.runner import make_evaluator
import streamkv.backends.triton_kernels as tk

dev = torch.device("cuda")
orig = tk.kv_update
vocab, n_sink, window, R = 50304, 4, 2048, 32
prefill = n_sink + window
ids = bench_ids(2600, vocab, None).to(dev)
hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 2560
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
dt = sys.argv[3] if len(sys.argv) > 3 else "float16"
model = neox_model(getattr(torch, dt), layers, hidden, hidden // 80, vocab, dev)
res = {}
for capture in (False,):
    for nb in (0, 1, hidden // 80):
        for pdl in (False,):
            tk.kv_update = functools.partial(orig, head_blocks=max(nb, 1))
            cfg = compose_run(["model=tiny_neox", "cache=ring", f"backend={'cudagraph' if nb == 0 else 'cudagraph_fused_gemv'}", f"n_sink={n_sink}",
                               f"window={window}", f"compress_every={R}", f"prefill_tokens={prefill}", "device=cuda",
                               f"dtype={dt}", "progress=false"] + ([] if capture else ["backend.capture=false"]))
            ev = make_evaluator(cfg, model, len(ids), dev)
            ev.gemv = GemvOptions(max_bytes=None, pdl=pdl)
            ev.warm_up(ids, prefill, 4)
            r = ev.run(ids, prefill)
            res[(capture, nb, pdl)] = r.nll[prefill:].astype(np.float64)
            c = getattr(ev, "slots", None)
            print(capture, nb, pdl, "ppl", float(np.exp(res[(capture, nb, pdl)].mean())), "n_fix", getattr(c, "n_fix", "?"),
                  "has_side", getattr(c, "has_side", "?"), flush=True)
            del ev
ref = res[(False, 0, False)]
for k, v in res.items():
    d = np.abs(v - ref)
    print(k, "vs the reference: max", d.max(), "first diff at", int(np.argmax(d > 0)) if (d > 0).any() else None)
