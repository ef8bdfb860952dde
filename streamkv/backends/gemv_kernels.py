"""Decode GEMVs (one activation row) with the op before them fused into the activation load.

* `add_rmsnorm_gemv`: y = W @ rmsnorm(x + r) * gamma (+ bias), also returning the new residual
  s = x + r. Replaces liger's fused add + RMSNorm and the GEMV after it (the next layer's q/k/v
  projection, the gate/up projection, the LM head after the final norm).
* `swiglu_gemv`: y = Wd @ (silu(g) * u) for gu = [g | u] (the fused gate/up output): replaces
  liger's SwiGLU and the down projection.
* GPT-NeoX (streamkv/backends/fused_neox.py): `gemv(..., adds=)` adds up to two residual rows to the
  biased output (the sequential residual's adds in the epilogues of dense and dense_4h_to_h), and
  `layer_norm_gemv` is the final LayerNorm + embed_out; `gemv_pair` runs query_key_value of ln1(x) and
  dense_h_to_4h of ln2(x) (+ bias + exact GELU) as one launch: one grid over both weights' rows, so the
  larger read streams at a higher bandwidth than two GEMVs and no bias_gelu launch follows.

Why our own kernel: the captured decode step of a small model is launch/latency-bound, not
bandwidth-bound (SmolLM2-135M reads 270 MB per token, 92 us at H100 bandwidth, but runs 321 kernels
in ~0.9 ms: cuBLAS GEMVs of 1-3.5 MB take 3.5-4 us each, mostly launch and DRAM latency), so every
launch fused away saves ~3 us. No maintained kernel does this fusion: liger-kernel has fused
add + RMSNorm and SwiGLU but no GEMV with a norm or activation prologue; cuBLAS(Lt) epilogues
cannot apply a function to the *input* vector, and its GEMV is a separate launch; torch.compile
would generate the same kind of Triton kernel but only in its own graphs, not in our hand-captured
step.

Arithmetic (bf16 activations, float32 accumulation) reproduces the unfused path's roundings
(HF / liger "llama" casting): s = bf16(x + r); h = bf16(gamma * bf16(s * rstd)), rstd in float32;
act = bf16(bf16(silu(g)) * u). Only the accumulation order of the dot products differs from cuBLAS.
`exact=False` (add_rmsnorm_gemv only) instead computes y = rstd * (W @ (s * gamma)) in one pass:
the weight loads then do not wait for the norm's reduction (one L2 round trip + a block barrier
less on the critical path), at the price of not rounding h to bf16 (a difference of the order of
bf16 rounding of the output; float32 inputs are unaffected).

Launch configuration: fixed per shape by `gemv_config` / `gemv_unroll` (no autotune: a CUDA graph
capture must not trigger benchmarking, and the configs are cheap to reason about): BLOCK_N rows per
program, small enough that the grid has >= 2 programs per SM (several CTAs per SM keep enough loads
in flight to hide DRAM latency, the limit for 1-4 MB weights); BLOCK_K the largest power of two
<= 256 dividing K (no masked tail); num_warps such that a thread loads 16 bytes of weights per
chunk (one ld.global.v4); K chunks unrolled in groups of ~8 (~128 bytes in flight per thread) inside
a runtime loop, fully unrolled where K is small (SmolLM2: all 9 chunks of K = 576). Checked in the
sm_90 PTX/SASS compiled here without a GPU (triton 3.9): all weight loads are 16-byte vector loads,
no barrier inside the K loop, 55-100 registers and no spills for every shape of the three models (a
fully unrolled K = 11008 loop at 8 warps spilled 13 KB a thread). No split-K: the shapes that have
few rows (N = hidden) still get >= 1 program per SM at BLOCK_N <= 4, and split-K would need either
atomics (a zeroed output: one more launch) or a second reduction launch, which is what we remove.
scripts/gemv_bench.py times these configs against liger + cuBLAS and sweeps their neighbours.

Not fused (measured by reasoning, not on the GPU): the split-KV attention reduce into the o_proj
prologue. Every o_proj program would have to redo the reduce over all heads (the partial sums are
Hq x splits x D float32: ~200 KB for SmolLM2 at 88 splits) to build its activation vector, against
~9 KB of weights per program; that is ~50 MB of L2 reads per layer, more than the launch it saves.

Tested on CPU through TRITON_INTERPRET=1 (tests/test_backends.py); timed by scripts/gemv_bench.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamkv.backends.pdl import pdl_enter

_PRO_NONE, _PRO_ADD_RMSNORM, _PRO_SWIGLU, _PRO_LAYERNORM = 0, 1, 2, 3


@triton.jit
def _load_s(x_ptr, r_ptr, k2, km2, HAS_R: tl.constexpr):
    """s = x + r (rounded to the activation dtype, as the unfused add), or x."""
    s = tl.load(x_ptr + k2, mask=km2, other=0.0)
    if HAS_R:
        s = (s.to(tl.float32) + tl.load(r_ptr + k2, mask=km2, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
    return s


@triton.jit
def _chunk(c, acc, ss, mean, rstd, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero, first_row,
           K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr, WRITE_S: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """One K chunk c. MODE 0: plain GEMV; 1: norm pass 1 (sum of squares, residual write); 2: norm
    pass 2 (exact casts, rstd given); 3: one-pass norm; 4: SwiGLU; 7: LayerNorm (mean and rstd given)."""
    act_ty = x_ptr.dtype.element_ty
    k2 = c * BLOCK_K + kk[None, :] + zero
    km2 = k2 < K
    if MODE == 7:  # LayerNorm of x (no residual add: GPT-NeoX's adds happen in the GEMV epilogues)
        if K % BLOCK_K == 0:
            w = tl.load(wrow + k2, mask=rmask[:, None], other=0.0)
        else:
            w = tl.load(wrow + k2, mask=rmask[:, None] & km2, other=0.0)
        s = tl.load(x_ptr + k2, mask=km2, other=0.0).to(tl.float32)
        g = tl.load(gamma_ptr + k2, mask=km2, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + k2, mask=km2, other=0.0).to(tl.float32)
        h = ((s - mean) * rstd * g + b).to(act_ty)  # the LayerNorm's output as the unfused kernel stores it
        acc += w.to(tl.float32) * h.to(tl.float32)
        return acc, ss
    if MODE != 1:
        if K % BLOCK_K == 0:
            w = tl.load(wrow + k2, mask=rmask[:, None], other=0.0)
        else:
            w = tl.load(wrow + k2, mask=rmask[:, None] & km2, other=0.0)
    if MODE == 0:
        acc += w.to(tl.float32) * tl.load(x_ptr + k2, mask=km2, other=0.0).to(tl.float32)
    elif MODE == 4:  # x = gu: [gate (K) | up (K)]
        gt = tl.load(x_ptr + k2, mask=km2, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + k2, mask=km2, other=0.0)
        a = ((gt * tl.sigmoid(gt)).to(act_ty).to(tl.float32) * up.to(tl.float32)).to(act_ty)
        acc += w.to(tl.float32) * a.to(tl.float32)
    else:
        s = _load_s(x_ptr, r_ptr, k2, km2, HAS_R)
        if MODE != 2:
            if WRITE_S:
                tl.store(s_ptr + k2, s, mask=km2 & first_row)
            sf = s.to(tl.float32)
            ss += sf * sf
        if MODE >= 2:
            g = tl.load(gamma_ptr + k2, mask=km2, other=0.0).to(tl.float32)
            if MODE == 2:
                n = (s.to(tl.float32) * rstd).to(act_ty)
                acc += w.to(tl.float32) * (n.to(tl.float32) * g).to(act_ty).to(tl.float32)
            else:
                acc += w.to(tl.float32) * (s.to(tl.float32) * g)
    return acc, ss


@triton.jit
def _k_loop(acc, ss, mean, rstd, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero, first_row,
            K: tl.constexpr, MODE: tl.constexpr, HAS_R: tl.constexpr, WRITE_S: tl.constexpr,
            BLOCK_K: tl.constexpr, UNROLL: tl.constexpr):
    """All K chunks: groups of UNROLL chunks unrolled (their loads issued together: bytes in flight
    per thread) in a runtime loop (bounded registers: a fully unrolled 7B down projection spills)."""
    NK: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    NO: tl.constexpr = NK // UNROLL
    for o in range(NO):
        for j in tl.static_range(UNROLL):
            acc, ss = _chunk(o * UNROLL + j, acc, ss, mean, rstd, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr,
                             s_ptr, kk, zero, first_row, K, MODE, HAS_R, WRITE_S, BLOCK_K)
    for c in tl.static_range(NO * UNROLL, NK):
        acc, ss = _chunk(c, acc, ss, mean, rstd, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero,
                         first_row, K, MODE, HAS_R, WRITE_S, BLOCK_K)
    return acc, ss


@triton.jit
def _ln_stats(x_ptr, eps, K: tl.constexpr, K_POW2: tl.constexpr):
    """LayerNorm's (mean, rstd) of x [K] in float32: the mean, then the centred variance."""
    offs = tl.arange(0, K_POW2)
    xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    mean = tl.sum(xv, 0) / K
    xc = tl.where(offs < K, xv - mean, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / K + eps)


@triton.jit
def _gemv_kernel(x_ptr, r_ptr, gamma_ptr, beta_ptr, w_ptr, b_ptr, e1_ptr, e2_ptr, y_ptr, s_ptr, eps, N, stride_wn,
                 K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_R: tl.constexpr, WRITE_S: tl.constexpr,
                 EXACT: tl.constexpr, HAS_BIAS: tl.constexpr, N_ADD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, K_POW2: tl.constexpr,
                 PDL: tl.constexpr = False):
    # The activation is loaded as a [BLOCK_N, BLOCK_K] tile (every row of the block reads the same K
    # values: L1 hits) in the weight tile's layout, and the norm's sum of squares is reduced along the
    # same axis as the dot products: no layout conversion through shared memory, hence no barrier
    # between the weight loads of successive K chunks (a 1-D activation vector broadcast to the tile
    # costs a shared-memory round trip + bar.sync per chunk, seen in the PTX).
    pdl_enter(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kk = tl.arange(0, BLOCK_K)
    zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    first_row = (zero + pid * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]) == 0  # program 0, row 0: writes s
    wrow = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PROLOGUE == 1:
        if EXACT:  # pass 1: rstd of s = x + r (+ the residual write); pass 2: h = bf16(gamma * bf16(s * rstd))
            acc, ss = _k_loop(acc, ss, 0.0, 0.0, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero,
                              first_row, K, 1, HAS_R, WRITE_S, BLOCK_K, UNROLL)
            rstd = tl.rsqrt(tl.sum(ss, 1) / K + eps)[:, None]
            acc, ss = _k_loop(acc, ss, 0.0, rstd, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero,
                              first_row, K, 2, HAS_R, WRITE_S, BLOCK_K, UNROLL)
            y = tl.sum(acc, 1)
        else:  # one pass: y = rstd * (W @ (s * gamma)); the weight loads do not wait for the norm
            acc, ss = _k_loop(acc, ss, 0.0, 0.0, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero,
                              first_row, K, 3, HAS_R, WRITE_S, BLOCK_K, UNROLL)
            y = tl.sum(acc, 1) * tl.rsqrt(tl.sum(ss, 1) / K + eps)
    elif PROLOGUE == 3:  # LayerNorm: mean, then the centred variance (as the unfused kernel), then the weights.
        # The statistics from x as one 1-D vector (K_POW2 wide): two block reductions, not a replicated
        # [BLOCK_N, BLOCK_K] tile pass per statistic (BLOCK_N times the load instructions). Not faster, measured
        # on Pythia-2.8B's shapes on an H200: the one-pass form rstd * (W @ (x * gamma) - mean * W @ gamma)
        # + W @ beta, whose weight loads do not wait for the statistics (2.631 vs 2.610 ms/token).
        mean, rstd = _ln_stats(x_ptr, eps, K, K_POW2)
        acc, ss = _k_loop(acc, ss, mean, rstd, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero,
                          first_row, K, 7, HAS_R, WRITE_S, BLOCK_K, UNROLL)
        y = tl.sum(acc, 1)
    else:
        acc, ss = _k_loop(acc, ss, 0.0, 0.0, wrow, rmask, x_ptr, r_ptr, gamma_ptr, beta_ptr, s_ptr, kk, zero,
                          first_row, K, 4 if PROLOGUE == 2 else 0, HAS_R, WRITE_S, BLOCK_K, UNROLL)
        y = tl.sum(acc, 1)
    # epilogue, on the N outputs only: bias and residual adds summed in float32, rounded once
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if N_ADD >= 1:
        y += tl.load(e1_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if N_ADD >= 2:
        y += tl.load(e2_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _plain_rows(pid, x_ptr, w_ptr, b_ptr, y_ptr, N, stride_wn, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                GELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr):
    """Rows [pid * BLOCK_N, ...) of y = W @ x, rounded to y's dtype as a GEMV's output, then (+ bias, rounded)
    and exact GELU as `triton_kernels.bias_gelu` computes them."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kk = tl.arange(0, BLOCK_K)
    zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    wrow = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    # the bias before the weights: loaded in the epilogue it would add a memory round trip to every program
    bias = tl.load(b_ptr + rows, mask=rmask & HAS_BIAS, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc, _ = _k_loop(acc, acc, 0.0, 0.0, wrow, rmask, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, kk, zero, zero != 0,
                     K, 0, False, False, BLOCK_K, UNROLL)
    out_ty = y_ptr.dtype.element_ty
    y = tl.sum(acc, 1).to(out_ty)
    if HAS_BIAS:
        y = (y.to(tl.float32) + bias).to(out_ty)
    if GELU:
        u = y.to(tl.float32)
        y = (0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))).to(out_ty)
    tl.store(y_ptr + rows, y, mask=rmask)


@triton.jit
def _gemv_pair_kernel(x1_ptr, w1_ptr, y1_ptr, x2_ptr, w2_ptr, b2_ptr, y2_ptr, N1, N2, stride1, stride2,
                      K: tl.constexpr, HAS_BIAS2: tl.constexpr, GELU2: tl.constexpr, BLOCK_N1: tl.constexpr,
                      BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL1: tl.constexpr, UNROLL2: tl.constexpr,
                      PDL: tl.constexpr = False):
    # programs [0, cdiv(N1, BLOCK_N1)) compute y1, the others y2: one grid, one launch
    pdl_enter(PDL)
    pid = tl.program_id(0)
    nb1 = tl.cdiv(N1, BLOCK_N1)
    if pid < nb1:
        _plain_rows(pid, x1_ptr, w1_ptr, w1_ptr, y1_ptr, N1, stride1, K, False, False, BLOCK_N1, BLOCK_K, UNROLL1)
    else:
        _plain_rows(pid - nb1, x2_ptr, w2_ptr, b2_ptr, y2_ptr, N2, stride2, K, HAS_BIAS2, GELU2, BLOCK_N2, BLOCK_K,
                    UNROLL2)


_N_SM: dict = {}


def _n_sm(device) -> int:
    if device.type != "cuda":
        return 132
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _N_SM:
        _N_SM[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _N_SM[key]


# (N, K) -> (BLOCK_N, BLOCK_K, num_warps) measured fastest on an H100 80GB HBM3 (scripts/gemv_bench.py's
# neighbourhood sweep, 2026-11-26, docs/benchmarks/gemv_bench-h100.json): SmolLM2-135M's shapes, where
# the heuristic below picked configs 15-40 % slower (one program per few rows of a 1-3 MB weight is
# latency-bound: fewer, wider programs win). Other shapes use the heuristic.
MEASURED = {
    (960, 576): (4, 128, 2),     # qkv
    (3072, 576): (8, 128, 4),    # gate_up
    (49152, 576): (16, 128, 4),  # lm_head
    (576, 1536): (2, 512, 2),    # down
    (576, 576): (2, 64, 1),      # o_proj
    # GPT-NeoX pythia-2.8b (float16), measured on an H200 (2026-12-02, docs/benchmarks/gemv_bench_pythia-h200.json)
    (7680, 2560): (16, 256, 8),   # query_key_value
    (2560, 2560): (4, 256, 8),    # dense
    (10240, 2560): (32, 256, 8),  # dense_h_to_4h
    (2560, 10240): (2, 256, 4),   # dense_4h_to_h: measured in the step, beside the attention (the sweep: (4, 256, 8))
    (50304, 2560): (16, 256, 4),  # embed_out
}


# (N1, N2, K) -> `gemv_pair`'s two configs, measured fastest on an H200 (2026-12-03, the pair's sweep in
# docs/benchmarks/neox_pair_variants/): Pythia-2.8B's query_key_value + dense_h_to_4h, 23.7 us against 25.6 at
# the two single-GEMV configs (16, 32 rows a program).
MEASURED_PAIRS = {
    (7680, 10240, 2560): ((32, 256, 8), (16, 256, 8)),
}


def load_measured(path) -> dict:
    """Add the best launch configs of a `scripts/gemv_bench.py` JSON (its rows' N, K, best_cfg) to
    MEASURED, for the shapes where the best config beat the heuristic one; returns what was added.
    A tuning hook for benchmarks (`python -m streamkv.bench --gemv-configs FILE`): configs that prove
    themselves end to end belong in MEASURED itself."""
    import json

    added = {}
    for row in json.loads(open(path).read())["rows"]:
        if row.get("best_cfg") and row.get("best_us", float("inf")) < row.get("ours_us", float("inf")):
            added[(int(row["N"]), int(row["K"]))] = tuple(int(v) for v in row["best_cfg"])
    MEASURED.update(added)
    return added


def gemv_config(N: int, K: int, n_sm: int = 132) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [N, K] weight and one activation row (see the module doc;
    scripts/gemv_bench.py prints it for every benchmarked shape)."""
    if (N, K) in MEASURED:
        return MEASURED[(N, K)]
    block_k = 256
    while block_k > 16 and K % block_k:
        block_k //= 2
    if K % block_k:  # no power of two >= 16 divides K: masked tail
        block_k = min(256, triton.next_power_of_2(K))
    block_n = 16
    while block_n > 1 and triton.cdiv(N, block_n) < 2 * n_sm:
        block_n //= 2
    block_n = max(block_n, min(16, 256 // block_k))  # at least 256 elements (one warp x 16 bytes) a chunk
    num_warps = max(1, min(8, block_n * block_k // 256))
    return block_n, block_k, num_warps


def gemv_unroll(K: int, block_n: int, block_k: int, num_warps: int) -> int:
    """K chunks unrolled together: ~128 bytes of weights in flight per thread (8 x 16-byte loads; more
    spills: a fully unrolled K = 11008 loop at 8 warps needs ~500 registers a thread); all of them
    when that covers K in at most two groups (no runtime loop for the small models' K = 576)."""
    nk = triton.cdiv(K, block_k)
    per_thread = max(1, block_n * block_k // (32 * num_warps)) * 2  # weight bytes a thread loads per chunk
    u = max(1, 128 // per_thread)
    return nk if nk <= 2 * u else u


def _launch(x, w, K, prologue, *, r=None, gamma=None, beta=None, bias=None, adds=(), s_out=None, eps=0.0,
            exact=True, config=None, out_dtype=None, pdl=False):
    N = w.shape[0]
    assert w.stride(1) == 1 and w.shape[1] == K, (tuple(w.shape), K)
    assert len(adds) <= 2 and all(a.numel() == N and a.is_contiguous() for a in adds), "epilogue adds: <= 2 [N] rows"
    block_n, block_k, num_warps = config or gemv_config(N, K, _n_sm(w.device))
    unroll = gemv_unroll(K, block_n, block_k, num_warps)
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=out_dtype or x.dtype)
    assert x.numel() == (2 * K if prologue == _PRO_SWIGLU else K), "decode GEMV: one activation row"
    e1, e2 = (list(adds) + [x, x])[:2]
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, r if r is not None else x, gamma if gamma is not None else x, beta if beta is not None else x, w,
        bias if bias is not None else w, e1, e2, y, s_out if s_out is not None else x, float(eps), N, w.stride(0),
        K=K, PROLOGUE=prologue, HAS_R=r is not None, WRITE_S=s_out is not None, EXACT=exact,
        HAS_BIAS=bias is not None, N_ADD=len(adds), BLOCK_N=block_n, BLOCK_K=block_k, UNROLL=unroll,
        K_POW2=triton.next_power_of_2(K) if prologue == _PRO_LAYERNORM else 1, num_warps=num_warps,
        PDL=pdl, launch_pdl=pdl)
    return y


def add_rmsnorm_gemv(x, r, gamma, w, eps: float, bias=None, *, exact: bool = True, write_residual: bool = True,
                     config=None, out_dtype=None):
    """y = w @ rmsnorm(x + r) * gamma (+ bias) for one row x [..., K] (contiguous); r: the residual
    (same shape) or None (plain RMSNorm); w: [N, K] (rows contiguous). Returns (y [..., N], s) with
    s = x + r, a new tensor written by program 0 (the others read only x and r: race-free), x itself
    when r is None, None when not `write_residual`."""
    K = x.shape[-1]
    s = torch.empty_like(x) if r is not None and write_residual else (x if r is None else None)
    y = _launch(x, w, K, _PRO_ADD_RMSNORM, r=r, gamma=gamma, bias=bias, s_out=s if r is not None else None,
                eps=eps, exact=exact, config=config, out_dtype=out_dtype)
    return y, s


def layer_norm_gemv(x, gamma, beta, w, eps: float, bias=None, *, config=None, out_dtype=None):
    """y = w @ layer_norm(x; gamma, beta) (+ bias) for one row x [..., K] (GPT-NeoX's final norm + embed_out).
    The norm is computed as `triton_kernels.add_layer_norm` does (float32 mean, centred variance, output
    rounded to x's dtype before the dot)."""
    return _launch(x, w, x.shape[-1], _PRO_LAYERNORM, gamma=gamma, beta=beta, bias=bias, eps=eps, config=config,
                   out_dtype=out_dtype)


def swiglu_gemv(gu, w, *, config=None, out_dtype=None):
    """y = w @ (silu(g) * u) for gu = [g | u] of one row [..., 2 I] (contiguous); w: [N, I]."""
    return _launch(gu, w, gu.shape[-1] // 2, _PRO_SWIGLU, config=config, out_dtype=out_dtype)


def gemv(x, w, bias=None, *, adds=(), config=None, out_dtype=None, pdl: bool = False):
    """y = w @ x (+ bias) (+ the rows in `adds`, up to two [N] tensors: GPT-NeoX's residual adds, summed in
    float32 with the biased output and rounded once) for one row x [..., K]. pdl: launched with programmatic
    dependent launch (streamkv/backends/pdl.py)."""
    return _launch(x, w, x.shape[-1], _PRO_NONE, bias=bias, adds=tuple(adds), config=config, out_dtype=out_dtype,
                   pdl=pdl)


def gemv_pair(x1, w1, x2, w2, bias2=None, *, gelu2: bool = False, configs=None, pdl: bool = False):
    """(w1 @ x1, w2 @ x2 (+ bias2) (then exact GELU)) for two activation rows of the same width K, in one launch
    (GPT-NeoX's parallel residual: query_key_value of ln1(x) and dense_h_to_4h of ln2(x)). The second output is
    rounded as `bias_gelu(F.linear(x2, w2), bias2)` rounds. configs: ((BLOCK_N, BLOCK_K, num_warps) for w1, for
    w2); one launch has one BLOCK_K and num_warps, the smaller BLOCK_K and the larger num_warps of the two."""
    K = x1.shape[-1]
    assert x2.shape[-1] == K and x1.numel() == K == x2.numel(), "decode GEMVs: one activation row each, same K"
    for w in (w1, w2):
        assert w.stride(1) == 1 and w.shape[1] == K, (tuple(w.shape), K)
    N1, N2 = w1.shape[0], w2.shape[0]
    n_sm = _n_sm(w1.device)
    (bn1, bk1, nw1), (bn2, bk2, nw2) = (configs or MEASURED_PAIRS.get((N1, N2, K))
                                        or (gemv_config(N1, K, n_sm), gemv_config(N2, K, n_sm)))
    block_k, num_warps = min(bk1, bk2), max(nw1, nw2)
    y1 = torch.empty(*x1.shape[:-1], N1, device=x1.device, dtype=x1.dtype)
    y2 = torch.empty(*x2.shape[:-1], N2, device=x2.device, dtype=x2.dtype)
    _gemv_pair_kernel[(triton.cdiv(N1, bn1) + triton.cdiv(N2, bn2),)](
        x1, w1, y1, x2, w2, bias2 if bias2 is not None else w2, y2, N1, N2, w1.stride(0), w2.stride(0),
        K=K, HAS_BIAS2=bias2 is not None, GELU2=gelu2, BLOCK_N1=bn1, BLOCK_N2=bn2, BLOCK_K=block_k,
        UNROLL1=gemv_unroll(K, bn1, block_k, num_warps), UNROLL2=gemv_unroll(K, bn2, block_k, num_warps),
        num_warps=num_warps, PDL=pdl, launch_pdl=pdl)
    return y1, y2
