"""query_key_value (7680 x 2560) and dense_h_to_4h (10240 x 2560, + bias + GELU) of Pythia-2.8B, float16, one
activation row each: cuBLAS one after the other, cuBLAS on two streams, and our paired GEMV at several launch
configs. Each timed as a CUDA graph of 40 repetitions over 4 weight copies (no L2 reuse), best of 5 replays.
From the project root, on a GPU:  python docs/benchmarks/neox_pair_variants/pairbench.py OUT.json"""
import json, sys, itertools
import torch, torch.nn.functional as F
from streamkv.backends.gemv_kernels import gemv_pair, gemv
from streamkv.backends.triton_kernels import bias_gelu

dev = torch.device("cuda"); dt = torch.float16; K = 2560; N1, N2 = 7680, 10240
COP = 4
W1 = [torch.randn(N1, K, device=dev, dtype=dt) * 0.02 for _ in range(COP)]
W2 = [torch.randn(N2, K, device=dev, dtype=dt) * 0.02 for _ in range(COP)]
b2 = torch.randn(N2, device=dev, dtype=dt) * 0.02
h1 = torch.randn(1, K, device=dev, dtype=dt); h2 = torch.randn(1, K, device=dev, dtype=dt)
side = torch.cuda.Stream(priority=-1)
REPS = 40

def timed(fn):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            for r in range(COP):
                fn(r)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(REPS):
            fn(r % COP)
    g.replay(); torch.cuda.synchronize()
    best = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        best.append(e0.elapsed_time(e1) * 1000 / REPS)
    return min(best)

def seq(r):
    F.linear(h1, W1[r]); bias_gelu(F.linear(h2, W2[r]), b2)

def two_streams(r):
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        F.linear(h1, W1[r])
    bias_gelu(F.linear(h2, W2[r]), b2)
    torch.cuda.current_stream().wait_stream(side)

ref1 = F.linear(h1, W1[0]); ref2 = bias_gelu(F.linear(h2, W2[0]), b2)
rows = {"cublas_sequential_us": timed(seq), "cublas_two_streams_us": timed(two_streams),
        "cublas_qkv_alone_us": timed(lambda r: F.linear(h1, W1[r])),
        "cublas_h4h_gelu_alone_us": timed(lambda r: bias_gelu(F.linear(h2, W2[r]), b2))}
print(rows, flush=True)
pair = {}
for bn1, bn2, warps in itertools.product((8, 16, 32), (16, 32, 64), (4, 8)):
    cfg = ((bn1, 256, warps), (bn2, 256, warps))
    try:
        y1, y2 = gemv_pair(h1, W1[0], h2, W2[0], b2, gelu2=True, configs=cfg)
        err = max((y1 - ref1).abs().max().item(), (y2 - ref2).abs().max().item())
        us = timed(lambda r: gemv_pair(h1, W1[r], h2, W2[r], b2, gelu2=True, configs=cfg))
    except Exception as exc:
        us, err = None, repr(exc)[:200]
    pair[str(cfg)] = {"us": us, "err": err}
    print(cfg, us, err, flush=True)
rows["pair_default_us"] = timed(lambda r: gemv_pair(h1, W1[r], h2, W2[r], b2, gelu2=True))
rows["pair_sweep"] = pair
total_mb = (N1 + N2) * K * 2 / 1e6
rows["weights_mb"] = total_mb
rows["meta"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
print({k: v for k, v in rows.items() if k != "pair_sweep"})
json.dump(rows, open(sys.argv[1], "w"), indent=1)
