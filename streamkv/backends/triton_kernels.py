"""Our own Triton kernels for the captured decode step, only where no maintained library fits.

* `kv_update`: RoPE of the step's query and key fused with the write into the slot cache (key rotated
  at its position for the ring layout, raw for the static one), the value write, the un-rotated side
  copy (ring), and the re-rotation of the scheduled "fix" slots (sinks, refresh tokens) from the
  side buffer. liger-kernel's RoPE rotates q and k in place but cannot scatter into a slot ring nor
  re-rotate other tokens; as separate ops this is 5-8 launches per layer, here it is one.
  Partial rotary (GPT-NeoX: `rotary_dim` < head_dim rotates only the first rotary_dim dims, the rest
  pass through), head dims that are not a power of two (blocks padded, masked), the q/k/v layout of
  the fused projection (`qkv_layout`: "grouped" [Q | K | V], Llama; "per_head" [q k v] per head,
  GPT-NeoX, so no weight is permuted) and an optional q/k/v bias added on the fly.
* `decode_attention`: one query token against a slot cache with a validity mask, GQA, split over the
  keys (flash-decoding) so that a 3-KV-head model still fills the GPU; optional on-the-fly RoPE of
  the keys at their slot index (static layout). The available libraries do not fit:
  SDPA's flash kernel takes no mask, its memory-efficient kernel does not split the keys (one CTA
  per head walks all 2k keys), flash-attn / flashinfer are not installed, liger has no attention.
  Scores accumulate in float32 (GPT-NeoX overflows float16 otherwise). Two kernels: the head dim as
  tensor-core dots over the query heads of one KV head (GQA), and whole rows per query head on CUDA
  cores for partial rotary with the keys stored rotated (GPT-NeoX's 20 of 80 dims would be three padded
  dots).
* `add_layer_norm`, `bias_gelu`: GPT-NeoX's small steps between the cuBLAS GEMVs, one launch each
  (streamkv/backends/fused_neox.py): the residual adds (with the output biases) + one or two
  LayerNorms of the sum; the up projection's bias + exact (erf) GELU.

Every scalar a step needs (step counter, slots, positions) is read from device memory inside the
kernels, so they can be captured once in a CUDA graph and replayed.
Tested on CPU through TRITON_INTERPRET=1 (tests/test_backends.py, tests/test_fused_neox.py) and on
the GPU by scripts/gpu_check.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamkv.backends.pdl import pdl_enter

QKV_LAYOUTS = ("grouped", "per_head")


@triton.jit
def _add_bias(x, b_ptr, offs, mask):
    """x + the bias at b_ptr + offs in float32, rounded back to x's dtype (as a biased GEMV's output)."""
    return (x.to(tl.float32) + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)


@triton.jit
def _kv_update_kernel(qkv_ptr, bias_ptr, q_out_ptr, k_ptr, v_ptr, side_ptr, cos_ptr, sin_ptr,
                      step_ptr, qpos_ptr, ws_ptr, sw_ptr, fslot_ptr, fsrc_ptr, fpos_ptr,
                      stride_kh, stride_sh,
                      HQ: tl.constexpr, HKV: tl.constexpr, HQP: tl.constexpr, HKVP: tl.constexpr,
                      D: tl.constexpr, DP: tl.constexpr, ROT: tl.constexpr, RHP: tl.constexpr,
                      Q_HS: tl.constexpr, KV_HS: tl.constexpr, K_OFF: tl.constexpr, V_OFF: tl.constexpr,
                      F: tl.constexpr, ROTATE_K: tl.constexpr, HAS_SIDE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NB: tl.constexpr = 1, PDL: tl.constexpr = False):
    # rotary dims [0, ROT) as two halves of RH (rotate_half), padded to RHP; dims [ROT, D) pass through.
    # The heads in NB blocks of HQ / NB query and HKV / NB KV heads (HQP, HKVP: a block's padded width): program
    # b + NB j does block b of the step's own token (j = 0) or of fix slot j - 1.
    pdl_enter(PDL)
    b = tl.program_id(0) % NB
    pid = tl.program_id(0) // NB
    t = tl.load(step_ptr)
    RH: tl.constexpr = ROT // 2
    HAS_PASS: tl.constexpr = ROT < D
    d = tl.arange(0, RHP)[None, :]
    dm = d < RH
    e = tl.arange(0, DP)[None, :]
    pm = (e >= ROT) & (e < D)  # the pass-through dims
    hk = b * (HKV // NB) + tl.arange(0, HKVP)[:, None]
    mk = tl.arange(0, HKVP)[:, None] < HKV // NB
    kdt = k_ptr.dtype.element_ty
    if pid == 0:  # the step's own token
        pos = tl.load(qpos_ptr + t)
        c = tl.load(cos_ptr + pos * ROT + d, mask=dm, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * ROT + d, mask=dm, other=0.0).to(tl.float32)
        hq = b * (HQ // NB) + tl.arange(0, HQP)[:, None]
        mq = tl.arange(0, HQP)[:, None] < HQ // NB
        q1 = tl.load(qkv_ptr + hq * Q_HS + d, mask=mq & dm, other=0.0)
        q2 = tl.load(qkv_ptr + hq * Q_HS + RH + d, mask=mq & dm, other=0.0)
        if HAS_BIAS:  # the projection's bias
            q1 = _add_bias(q1, bias_ptr, hq * Q_HS + d, mq & dm)
            q2 = _add_bias(q2, bias_ptr, hq * Q_HS + RH + d, mq & dm)
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
        qdt = q_out_ptr.dtype.element_ty
        tl.store(q_out_ptr + hq * D + d, (q1 * c - q2 * s).to(qdt), mask=mq & dm)
        tl.store(q_out_ptr + hq * D + RH + d, (q2 * c + q1 * s).to(qdt), mask=mq & dm)
        kb = qkv_ptr + K_OFF + hk * KV_HS
        k1 = tl.load(kb + d, mask=mk & dm, other=0.0)
        k2 = tl.load(kb + RH + d, mask=mk & dm, other=0.0)
        if HAS_BIAS:
            k1 = _add_bias(k1, bias_ptr, K_OFF + hk * KV_HS + d, mk & dm)
            k2 = _add_bias(k2, bias_ptr, K_OFF + hk * KV_HS + RH + d, mk & dm)
        ws = tl.load(ws_ptr + t)
        kslot = k_ptr + hk * stride_kh + ws * D
        if HAS_PASS:  # q's and k's pass-through dims: copied (+ bias)
            qp = tl.load(qkv_ptr + hq * Q_HS + e, mask=mq & pm, other=0.0)
            kp = tl.load(kb + e, mask=mk & pm, other=0.0)
            if HAS_BIAS:
                qp = _add_bias(qp, bias_ptr, hq * Q_HS + e, mq & pm)
                kp = _add_bias(kp, bias_ptr, K_OFF + hk * KV_HS + e, mk & pm)
            tl.store(q_out_ptr + hq * D + e, qp.to(qdt), mask=mq & pm)
            tl.store(kslot + e, kp.to(kdt), mask=mk & pm)
            if HAS_SIDE:
                sw = tl.load(sw_ptr + t)
                tl.store(side_ptr + hk * stride_sh + sw * D + e, kp, mask=mk & pm)
        if HAS_SIDE:
            sw = tl.load(sw_ptr + t)
            tl.store(side_ptr + hk * stride_sh + sw * D + d, k1, mask=mk & dm)
            tl.store(side_ptr + hk * stride_sh + sw * D + RH + d, k2, mask=mk & dm)
        if ROTATE_K:
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            tl.store(kslot + d, (k1f * c - k2f * s).to(kdt), mask=mk & dm)
            tl.store(kslot + RH + d, (k2f * c + k1f * s).to(kdt), mask=mk & dm)
        else:
            tl.store(kslot + d, k1, mask=mk & dm)
            tl.store(kslot + RH + d, k2, mask=mk & dm)
        v = tl.load(qkv_ptr + V_OFF + hk * KV_HS + e, mask=mk & (e < D), other=0.0)
        if HAS_BIAS:
            v = _add_bias(v, bias_ptr, V_OFF + hk * KV_HS + e, mk & (e < D))
        tl.store(v_ptr + hk * stride_kh + ws * D + e, v, mask=mk & (e < D))
    else:  # re-rotate one scheduled fix slot from its un-rotated side copy
        f = pid - 1
        slot = tl.load(fslot_ptr + t * F + f)
        src = tl.load(fsrc_ptr + t * F + f)
        pos = tl.load(fpos_ptr + t * F + f)
        c = tl.load(cos_ptr + pos * ROT + d, mask=dm, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * ROT + d, mask=dm, other=0.0).to(tl.float32)
        srow = side_ptr + hk * stride_sh + src * D
        r1 = tl.load(srow + d, mask=mk & dm, other=0.0).to(tl.float32)
        r2 = tl.load(srow + RH + d, mask=mk & dm, other=0.0).to(tl.float32)
        kslot = k_ptr + hk * stride_kh + slot * D
        tl.store(kslot + d, (r1 * c - r2 * s).to(kdt), mask=mk & dm)
        tl.store(kslot + RH + d, (r2 * c + r1 * s).to(kdt), mask=mk & dm)
        if HAS_PASS:
            tl.store(kslot + e, tl.load(srow + e, mask=mk & pm, other=0.0), mask=mk & pm)


def qkv_offsets(layout: str, n_heads: int, n_kv: int, D: int) -> dict:
    """Where head h's q, k, v start in one token's fused projection: q at h * Q_HS, k at K_OFF + h * KV_HS,
    v at V_OFF + h * KV_HS."""
    if layout == "grouped":  # [Q (Hq D) | K (Hkv D) | V (Hkv D)]
        return dict(Q_HS=D, KV_HS=D, K_OFF=n_heads * D, V_OFF=(n_heads + n_kv) * D)
    if layout == "per_head":  # [h0: q k v | h1: q k v | ...] (GPT-NeoX's query_key_value; MHA)
        if n_heads != n_kv:
            raise ValueError("qkv_layout 'per_head' needs as many KV heads as query heads")
        return dict(Q_HS=3 * D, KV_HS=3 * D, K_OFF=D, V_OFF=2 * D)
    raise ValueError(f"qkv_layout: '{layout}' is not one of {', '.join(QKV_LAYOUTS)}")


def kv_update(qkv, q_out, k, v, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos, *, n_heads, n_kv,
              rotate_k: bool, has_side: bool, rotary_dim: int | None = None, qkv_layout: str = "grouped",
              bias=None, head_blocks: int = 1, pdl: bool = False):
    """qkv: [(Hq + 2 Hkv) * D] of one token (un-rotated; `bias` of the same shape added if given), laid out
    as `qkv_layout` says; q_out: [Hq, D]; k, v: [Hkv, slots, D] (one layer); side: [Hkv, rows, D];
    cos/sin: [positions, rotary_dim] (rotary_dim = D when None); step: [1]; qpos/ws/sw: [n]; f*: [n, F].
    head_blocks: programs per token, each a block of the heads (it must divide both head counts; one program
    per KV head measured 1 % faster end to end on Pythia-2.8B's step than one program for all heads, see
    docs/benchmarks.md). pdl: launched with programmatic dependent launch (streamkv/backends/pdl.py)."""
    D = k.shape[-1]
    rot = D if rotary_dim is None else int(rotary_dim)
    if rot % 2 or not 0 < rot <= D or cos.shape[-1] != rot:
        raise ValueError(f"rotary_dim {rot} must be even, in (0, {D}] and the width of cos/sin ({cos.shape[-1]})")
    F = fslot.shape[1] if fslot is not None and fslot.dim() == 2 else 0
    if not has_side:
        side, sw = k, ws  # unused pointers
    if F == 0:
        fslot = fsrc = fpos = ws
    nb = int(head_blocks)
    if n_heads % nb or n_kv % nb:
        raise ValueError(f"kv_update: head_blocks {nb} must divide the head counts {n_heads} and {n_kv}")
    _kv_update_kernel[(nb * (1 + F),)](
        qkv, qkv if bias is None else bias, q_out, k, v, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos,
        k.stride(0), side.stride(0),
        HQ=n_heads, HKV=n_kv, HQP=triton.next_power_of_2(n_heads // nb), HKVP=triton.next_power_of_2(n_kv // nb),
        D=D, DP=triton.next_power_of_2(D), ROT=rot, RHP=triton.next_power_of_2(rot // 2),
        **qkv_offsets(qkv_layout, n_heads, n_kv, D),
        F=max(F, 1), ROTATE_K=rotate_k, HAS_SIDE=has_side, HAS_BIAS=bias is not None,
        NB=nb, num_warps=1 if D <= 64 else 2, PDL=pdl, launch_pdl=pdl)


@triton.jit
def _key_block(valid_ptr, start, end, i, BLOCK_N: tl.constexpr):
    """Block i of a split [start, end) of the keys: slot indices, in-split mask, and in-split and valid."""
    n = start + i + tl.arange(0, BLOCK_N)
    nm = n < end
    return n, nm, nm & (tl.load(valid_ptr + n, mask=nm, other=0) != 0)


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
                       stride_kh, scale, C: tl.constexpr, SPLIT_LEN: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, RHP: tl.constexpr,
                       PP: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr, ROTATE_K: tl.constexpr,
                       PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # the head dim in three padded, masked parts: the rotary halves [0, RH), [RH, ROT) (rotated together
    # in the static layout) and the pass-through dims [ROT, D) (GPT-NeoX's partial rotary)
    h = tl.program_id(0)  # KV head
    sp = tl.program_id(1)  # split of the keys
    RH: tl.constexpr = ROT // 2
    HAS_PASS: tl.constexpr = ROT < D
    g = tl.arange(0, GP)
    gm = g < G
    d = tl.arange(0, RHP)
    dm = d < RH
    p = tl.arange(0, PP)
    pm = p < D - ROT
    qrow = (h * G + g)[:, None] * D
    q1 = tl.load(q_ptr + qrow + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    q2 = tl.load(q_ptr + qrow + RH + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc1 = tl.zeros([GP, RHP], tl.float32)
    acc2 = tl.zeros([GP, RHP], tl.float32)
    if HAS_PASS:
        q3 = tl.load(q_ptr + qrow + ROT + p[None, :], mask=gm[:, None] & pm[None, :], other=0.0)
        acc3 = tl.zeros([GP, PP], tl.float32)
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, C)
    for i in range(0, SPLIT_LEN, BLOCK_N):
        n, nm, ok = _key_block(valid_ptr, start, end, i, BLOCK_N)
        km = nm[:, None] & dm[None, :]
        kp = k_ptr + h * stride_kh + n[:, None] * D + d[None, :]
        k1 = tl.load(kp, mask=km, other=0.0)
        k2 = tl.load(kp + RH, mask=km, other=0.0)
        if ROTATE_K:  # static layout: key n sits at position n (StreamingLLM's contiguous positions)
            cs = tl.load(cos_ptr + n[:, None] * ROT + d[None, :], mask=km, other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + n[:, None] * ROT + d[None, :], mask=km, other=0.0).to(tl.float32)
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            k1 = (k1f * cs - k2f * sn).to(k_ptr.dtype.element_ty)
            k2 = (k2f * cs + k1f * sn).to(k_ptr.dtype.element_ty)
        s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))  # float32 accumulation
        if HAS_PASS:
            pk = k_ptr + h * stride_kh + n[:, None] * D + ROT + p[None, :]
            s += tl.dot(q3, tl.trans(tl.load(pk, mask=nm[:, None] & pm[None, :], other=0.0)))
        s = s * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        vp = v_ptr + h * stride_kh + n[:, None] * D + d[None, :]
        v1 = tl.load(vp, mask=km, other=0.0)
        v2 = tl.load(vp + RH, mask=km, other=0.0)
        pv = pr.to(v1.dtype)
        acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1)
        acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2)
        if HAS_PASS:
            pvp = v_ptr + h * stride_kh + n[:, None] * D + ROT + p[None, :]
            acc3 = acc3 * alpha[:, None] + tl.dot(pv, tl.load(pvp, mask=nm[:, None] & pm[None, :], other=0.0))
        m_i = m_new
    row = (h * G + g) * NS + sp
    tl.store(m_ptr + row, m_i, mask=gm)
    tl.store(l_ptr + row, l_i, mask=gm)
    am = gm[:, None] & dm[None, :]
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc1, mask=am)
    tl.store(acc_ptr + row[:, None] * D + RH + d[None, :], acc2, mask=am)
    if HAS_PASS:
        tl.store(acc_ptr + row[:, None] * D + ROT + p[None, :], acc3, mask=gm[:, None] & pm[None, :])


@triton.jit
def _attn_rows_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
                      stride_kh, scale, C: tl.constexpr, SPLIT_LEN: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      DP: tl.constexpr, ROT: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr,
                      ROTATE_K: tl.constexpr, PDL: tl.constexpr = False, DB: tl.constexpr = 0):
    tl.static_assert(DB == 0 or not ROTATE_K, "two head-dim tiles need the keys stored rotated")
    pdl_enter(PDL)
    # one query head per program, whole key/value rows (one contiguous load each), scores and the weighted
    # sum on CUDA cores (no tensor-core dot to pad: the partial-rotary head dim, e.g. 80 = 20 + 60, is one
    # masked row of DP, or with DB > 0 two tiles, dims [0, DP) and [DP, DP + DB) masked to D: 80 = 64 + 16
    # unpadded, 154 registers instead of 181 at one warp); in the static layout (one tile) the rotary dims
    # [0, ROT) are rotated at read from a second, partner load (rotate_half: dim e pairs with e +- ROT/2)
    hq = tl.program_id(0)  # query head
    sp = tl.program_id(1)  # split of the keys
    h = hq // G
    RH: tl.constexpr = ROT // 2
    e = tl.arange(0, DP)
    em = e < D
    q = tl.load(q_ptr + hq * D + e, mask=em, other=0.0).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([DP], tl.float32)
    if DB > 0:  # the second tile
        f = DP + tl.arange(0, DB)
        fm = f < D
        qb = tl.load(q_ptr + hq * D + f, mask=fm, other=0.0).to(tl.float32)
        accb = tl.zeros([DB], tl.float32)
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, C)
    for i in range(0, SPLIT_LEN, BLOCK_N):
        n, nm, ok = _key_block(valid_ptr, start, end, i, BLOCK_N)
        rm = nm[:, None] & em[None, :]
        rows = h * stride_kh + n[:, None] * D
        k = tl.load(k_ptr + rows + e[None, :], mask=rm, other=0.0).to(tl.float32)
        if DB > 0:
            kb = tl.load(k_ptr + rows + f[None, :], mask=nm[:, None] & fm[None, :], other=0.0).to(tl.float32)
        if ROTATE_K:  # static layout: key n sits at position n
            rot = e < ROT
            partner = tl.where(e < RH, e + RH, e - RH)
            sign = tl.where(e < RH, -1.0, 1.0)
            cm = nm[:, None] & rot[None, :]
            kp = tl.load(k_ptr + rows + partner[None, :], mask=cm, other=0.0).to(tl.float32)
            cs = tl.load(cos_ptr + n[:, None] * ROT + e[None, :], mask=cm, other=1.0).to(tl.float32)
            sn = tl.load(sin_ptr + n[:, None] * ROT + e[None, :], mask=cm, other=0.0).to(tl.float32)
            k = k * cs + sign[None, :] * kp * sn
        s = tl.sum(k * q[None, :], 1)
        if DB > 0:
            s += tl.sum(kb * qb[None, :], 1)
        s = tl.where(ok, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(pr, 0)
        v = tl.load(v_ptr + rows + e[None, :], mask=rm, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(pr[:, None] * v, 0)
        if DB > 0:
            vb = tl.load(v_ptr + rows + f[None, :], mask=nm[:, None] & fm[None, :], other=0.0).to(tl.float32)
            accb = accb * alpha + tl.sum(pr[:, None] * vb, 0)
        m_i = m_new
    row = hq * NS + sp
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row * D + e, acc, mask=em)
    if DB > 0:
        tl.store(acc_ptr + row * D + f, accb, mask=fm)


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, NS: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr,
                        DP: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    hq = tl.program_id(0)
    sp = tl.arange(0, NSP)
    sm = sp < NS
    m = tl.load(m_ptr + hq * NS + sp, mask=sm, other=-1.0e30)
    l = tl.load(l_ptr + hq * NS + sp, mask=sm, other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    w = tl.where(sm, w, 0.0)
    d = tl.arange(0, DP)
    dm = d < D
    acc = tl.load(acc_ptr + (hq * NS + sp)[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
    tl.store(o_ptr + hq * D + d, o.to(o_ptr.dtype.element_ty), mask=dm)


def row_tiles(D: int, two: bool = True) -> tuple[int, int]:
    """The rows kernel's head-dim tiles (widths DP, DB): a head dim that is not a power of two in two tiles, the
    largest power of two below it and the rest padded (80 = 64 + 16: no padding, fewer registers; Pythia-2.8B's
    step 1.787 -> 1.783 ms/token on an H200, docs/benchmarks.md), else one tile (DB = 0). `two=False`: one padded
    tile (the static layout, whose rotation at read pairs dims within one tile)."""
    dp = triton.next_power_of_2(D)
    if not two or dp == D:
        return dp, 0
    return dp // 2, triton.next_power_of_2(D - dp // 2)


def _dot_width(n: int) -> int:
    """A tl.dot operand's padded width: a power of two, at least 16 (the tensor-core minimum)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


class DecodeAttention:
    """Split-KV decode attention over one layer's slot cache, with its scratch buffers allocated once
    (static addresses: capturable). `rotary_dim` (default head_dim): the rotated dims of the static
    layout's keys (cos/sin of that width); any head_dim (padded blocks)."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, capacity: int, device, dtype,
                 rotate_k: bool = False, block_n: int | None = None, n_sm: int | None = None,
                 rotary_dim: int | None = None, rows: bool | None = None, waves: int | None = None,
                 num_warps: int | None = None):
        # An earlier CUDA-core variant for MHA (no tensor-core dot padded to 16 query rows) measured 9% slower
        # than the parts kernel on the 7B shape (full rotary, head dim 128) on an H100: 733 vs 671 us per
        # token; so by default (rows=None) the rows kernel runs only for partial rotary.
        if n_sm is None:
            n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        self.G = n_heads // n_kv
        self.n_heads, self.n_kv, self.D, self.C = n_heads, n_kv, head_dim, capacity
        self.rot = head_dim if rotary_dim is None else int(rotary_dim)
        if self.rot % 2 or not 0 < self.rot <= head_dim:
            raise ValueError(f"rotary_dim {self.rot} must be even and in (0, {head_dim}]")
        # Partial rotary (GPT-NeoX: 20 of 80 dims) splits the parts kernel's head dim into three padded
        # tensor-core dots, mostly padding for one query row per KV head; with the keys stored rotated (ring
        # layout) the rows kernel runs instead (one query head per program, whole rows, more and shorter
        # splits). Rotating at read (static layout) costs it a second load: measured slower there.
        self.rows = (self.rot < head_dim and not rotate_k) if rows is None else bool(rows)
        # launch shape (block_n, waves, num_warps): keys per block, the programs aimed at per SM (the splits
        # of the keys follow from it), warps per program (measured on an H200 with scripts/attn_bench.py --tune: many small
        # programs keep more loads in flight. rows: one warp, ~8 programs per SM, Pythia-2.8B 11.5 against
        # 21.0 us per layer at 4 warps, ~4 per SM; parts with head_dim > 64: block_n 16, ~8 per SM, 2 warps,
        # Llama-7B 14.3 against 21.4 us at block_n 32, 8 warps, ~2 per SM; SmolLM2's head dim 64 was
        # already within 2 % of its best)
        launch = (64, 8, 1) if self.rows else (32, 2, 4) if head_dim <= 64 else (16, 8, 2)
        self.block_n = block_n = block_n or launch[0]
        self.waves = waves or launch[1]
        self.num_warps = num_warps or launch[2]
        n_blocks = triton.cdiv(capacity, block_n)
        programs = n_heads if self.rows else n_kv
        self.ns = max(1, min(n_blocks, triton.cdiv(self.waves * n_sm, programs)))
        self.split_len = triton.cdiv(n_blocks, self.ns) * block_n
        self.ns = triton.cdiv(capacity, self.split_len)
        self.rotate_k = rotate_k
        self.row_tiles = row_tiles(head_dim, two=not rotate_k)
        self.m = torch.empty(n_heads * self.ns, device=device, dtype=torch.float32)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_heads * self.ns, head_dim, device=device, dtype=torch.float32)
        self.out = torch.empty(n_heads, head_dim, device=device, dtype=dtype)

    def __call__(self, q, k, v, valid, scale: float, cos=None, sin=None, pdl: bool = False):
        """q: [Hq, D] (rotated); k, v: [Hkv, slots >= C, D]; valid: [>= C] bool -> [Hq, D] (a reused buffer).
        pdl: both launches with programmatic dependent launch (streamkv/backends/pdl.py)."""
        cos = k if cos is None else cos
        sin = k if sin is None else sin
        D, rot = self.D, self.rot
        if self.rows:
            _attn_rows_kernel[(self.n_heads, self.ns)](
                q, k, v, valid, cos, sin, self.m, self.l, self.acc, k.stride(0), scale, C=self.C,
                SPLIT_LEN=self.split_len, G=self.G, D=D, DP=self.row_tiles[0], ROT=rot,
                BLOCK_N=self.block_n, NS=self.ns, ROTATE_K=self.rotate_k, num_warps=self.num_warps,
                PDL=pdl, launch_pdl=pdl, DB=self.row_tiles[1])
        else:
            _attn_split_kernel[(self.n_kv, self.ns)](
                q, k, v, valid, cos, sin, self.m, self.l, self.acc, k.stride(0), scale, C=self.C,
                SPLIT_LEN=self.split_len, G=self.G, GP=_dot_width(self.G), D=D, ROT=rot, RHP=_dot_width(rot // 2),
                PP=_dot_width(D - rot), BLOCK_N=self.block_n, NS=self.ns,
                ROTATE_K=self.rotate_k, num_warps=self.num_warps, num_stages=2, PDL=pdl, launch_pdl=pdl)
        _attn_reduce_kernel[(self.n_heads,)](self.m, self.l, self.acc, self.out, NS=self.ns,
                                              NSP=triton.next_power_of_2(self.ns), D=D,
                                              DP=triton.next_power_of_2(D), num_warps=1, PDL=pdl,
                                              launch_pdl=pdl)
        return self.out


# ---------------------------------------------------------------- GPT-NeoX's small steps


@triton.jit
def _add_layer_norm_kernel(x_ptr, r1_ptr, c1_ptr, r2_ptr, c2_ptr, xo_ptr, wa_ptr, ba_ptr, ha_ptr, wb_ptr, bb_ptr,
                           hb_ptr, N, eps, BLOCK: tl.constexpr, N_ADD: tl.constexpr, HAS_C1: tl.constexpr,
                           HAS_C2: tl.constexpr, TWO: tl.constexpr, WRITE_X: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    i = tl.arange(0, BLOCK)
    m = i < N
    # the norm's weights first, with the inputs: loaded after the residual store they would be one more memory
    # round trip on the decode step's critical path (a store may alias them); wb, bb are wa, ba without TWO
    wa = tl.load(wa_ptr + i, mask=m, other=0.0).to(tl.float32)
    ba = tl.load(ba_ptr + i, mask=m, other=0.0).to(tl.float32)
    wb = tl.load(wb_ptr + i, mask=m, other=0.0).to(tl.float32)
    bb = tl.load(bb_ptr + i, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + i, mask=m, other=0.0).to(tl.float32)
    if N_ADD >= 1:
        x += tl.load(r1_ptr + i, mask=m, other=0.0).to(tl.float32)
        if HAS_C1:
            x += tl.load(c1_ptr + i, mask=m, other=0.0).to(tl.float32)
    if N_ADD >= 2:
        x += tl.load(r2_ptr + i, mask=m, other=0.0).to(tl.float32)
        if HAS_C2:
            x += tl.load(c2_ptr + i, mask=m, other=0.0).to(tl.float32)
    xr = x.to(xo_ptr.dtype.element_ty)  # the residual stream in the model's dtype, normed as stored
    if WRITE_X:
        tl.store(xo_ptr + i, xr, mask=m)
    xf = xr.to(tl.float32)
    mean = tl.sum(xf, 0) / N
    xc = tl.where(m, xf - mean, 0.0)
    y = xc / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    out = ha_ptr.dtype.element_ty
    tl.store(ha_ptr + i, (y * wa + ba).to(out), mask=m)
    if TWO:
        tl.store(hb_ptr + i, (y * wb + bb).to(out), mask=m)


def add_layer_norm(x, adds, ln_a, ln_b=None, eps: float = 1e-5, write_x: bool = True, pdl: bool = False):
    """One launch: s = x + sum(adds) (adds: up to two (tensor, bias or None) pairs, summed in float32 and
    rounded once to x's dtype), then LayerNorm(s) with (weight, bias) ln_a and, if given, ln_b (GPT-NeoX's
    parallel residual norms the same s twice). x, adds: [1, N]. Returns (s, ha, hb) (s is x itself when
    there is nothing to add or write_x=False; hb None without ln_b)."""
    adds = [a for a in (adds or ()) if a is not None and a[0] is not None]
    N = x.shape[-1]
    xo = torch.empty_like(x) if adds and write_x else x
    ha = torch.empty_like(x)
    hb = torch.empty_like(x) if ln_b is not None else None
    (r1, c1), (r2, c2) = (adds + [(x, None)] * 2)[:2]
    wb, bb = ln_b if ln_b is not None else ln_a
    _add_layer_norm_kernel[(1,)](
        x, r1, x if c1 is None else c1, r2, x if c2 is None else c2, xo, ln_a[0], ln_a[1], ha, wb, bb,
        ha if hb is None else hb, N, eps, BLOCK=triton.next_power_of_2(N), N_ADD=len(adds), HAS_C1=c1 is not None,
        HAS_C2=c2 is not None, TWO=ln_b is not None, WRITE_X=bool(adds) and write_x,
        num_warps=4 if N <= 2048 else 16, PDL=pdl, launch_pdl=pdl)  # 16 for Pythia-2.8B's 2560: 0.4 % faster than 8
    return xo, ha, hb


@triton.jit
def _bias_gelu_kernel(u_ptr, b_ptr, o_ptr, N, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    u = tl.load(u_ptr + i, mask=m, other=0.0)
    if HAS_BIAS:
        u = _add_bias(u, b_ptr, i, m)
    x = u.to(tl.float32)
    tl.store(o_ptr + i, (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(o_ptr.dtype.element_ty), mask=m)


def bias_gelu(u, bias=None, block: int = 1024):
    """gelu(u + bias), exact (erf) GELU as HF's "gelu"; u: [1, N]."""
    N = u.shape[-1]
    out = torch.empty_like(u)
    _bias_gelu_kernel[(triton.cdiv(N, block),)](u, u if bias is None else bias, out, N, BLOCK=block,
                                                 HAS_BIAS=bias is not None, num_warps=4)
    return out
