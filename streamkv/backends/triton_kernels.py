"""Our own Triton kernels for the captured decode step, only where no maintained library fits.

* `kv_update`: RoPE of the step's query and key fused with the write into the slot cache (key rotated
  at its position for the ring layout, raw for the static one), the value write, the un-rotated side
  copy (ring), and the re-rotation of the scheduled "fix" slots (sinks, refresh tokens) from the
  side buffer. liger-kernel's RoPE rotates q and k in place but cannot scatter into a slot ring nor
  re-rotate other tokens; as separate ops this is 5-8 launches per layer, here it is one.
* `decode_attention`: one query token against a slot cache with a validity mask, GQA, split over the
  keys (flash-decoding) so that a 3-KV-head model still fills the GPU; optional on-the-fly RoPE of
  the keys at their slot index (static layout). The available libraries do not fit:
  SDPA's flash kernel takes no mask, its memory-efficient kernel does not split the keys (one CTA
  per head walks all 2k keys), flash-attn / flashinfer are not installed, liger has no attention.

Every scalar a step needs (step counter, slots, positions) is read from device memory inside the
kernels, so they can be captured once in a CUDA graph and replayed.
Tested on CPU through TRITON_INTERPRET=1 (tests/test_backends.py) and on the GPU by
scripts/gpu_check.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_update_kernel(qkv_ptr, q_out_ptr, k_ptr, v_ptr, side_ptr, cos_ptr, sin_ptr,
                      step_ptr, qpos_ptr, ws_ptr, sw_ptr, fslot_ptr, fsrc_ptr, fpos_ptr,
                      stride_kh, stride_sh,
                      HQ: tl.constexpr, HKV: tl.constexpr, HQP: tl.constexpr, HKVP: tl.constexpr,
                      D: tl.constexpr, F: tl.constexpr, ROTATE_K: tl.constexpr, HAS_SIDE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(step_ptr)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)[None, :]
    hk = tl.arange(0, HKVP)[:, None]
    mk = hk < HKV
    if pid == 0:  # the step's own token
        pos = tl.load(qpos_ptr + t)
        c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        hq = tl.arange(0, HQP)[:, None]
        mq = hq < HQ
        q1 = tl.load(qkv_ptr + hq * D + d, mask=mq, other=0.0).to(tl.float32)
        q2 = tl.load(qkv_ptr + hq * D + HALF + d, mask=mq, other=0.0).to(tl.float32)
        tl.store(q_out_ptr + hq * D + d, (q1 * c - q2 * s).to(q_out_ptr.dtype.element_ty), mask=mq)
        tl.store(q_out_ptr + hq * D + HALF + d, (q2 * c + q1 * s).to(q_out_ptr.dtype.element_ty), mask=mq)
        kb = qkv_ptr + HQ * D
        k1 = tl.load(kb + hk * D + d, mask=mk, other=0.0)
        k2 = tl.load(kb + hk * D + HALF + d, mask=mk, other=0.0)
        ws = tl.load(ws_ptr + t)
        if HAS_SIDE:
            sw = tl.load(sw_ptr + t)
            tl.store(side_ptr + hk * stride_sh + sw * D + d, k1, mask=mk)
            tl.store(side_ptr + hk * stride_sh + sw * D + HALF + d, k2, mask=mk)
        if ROTATE_K:
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            tl.store(k_ptr + hk * stride_kh + ws * D + d, (k1f * c - k2f * s).to(k_ptr.dtype.element_ty), mask=mk)
            tl.store(k_ptr + hk * stride_kh + ws * D + HALF + d, (k2f * c + k1f * s).to(k_ptr.dtype.element_ty),
                     mask=mk)
        else:
            tl.store(k_ptr + hk * stride_kh + ws * D + d, k1, mask=mk)
            tl.store(k_ptr + hk * stride_kh + ws * D + HALF + d, k2, mask=mk)
        dd = tl.arange(0, D)[None, :]
        v = tl.load(kb + HKV * D + hk * D + dd, mask=mk, other=0.0)
        tl.store(v_ptr + hk * stride_kh + ws * D + dd, v, mask=mk)
    else:  # re-rotate one scheduled fix slot from its un-rotated side copy
        f = pid - 1
        slot = tl.load(fslot_ptr + t * F + f)
        src = tl.load(fsrc_ptr + t * F + f)
        pos = tl.load(fpos_ptr + t * F + f)
        c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        r1 = tl.load(side_ptr + hk * stride_sh + src * D + d, mask=mk, other=0.0).to(tl.float32)
        r2 = tl.load(side_ptr + hk * stride_sh + src * D + HALF + d, mask=mk, other=0.0).to(tl.float32)
        tl.store(k_ptr + hk * stride_kh + slot * D + d, (r1 * c - r2 * s).to(k_ptr.dtype.element_ty), mask=mk)
        tl.store(k_ptr + hk * stride_kh + slot * D + HALF + d, (r2 * c + r1 * s).to(k_ptr.dtype.element_ty),
                 mask=mk)


def kv_update(qkv, q_out, k, v, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos, *, n_heads, n_kv,
              rotate_k: bool, has_side: bool):
    """qkv: [(Hq + 2 Hkv) * D] of one token (un-rotated); q_out: [Hq, D]; k, v: [Hkv, slots, D] (one
    layer); side: [Hkv, rows, D]; cos/sin: [positions, D]; step: [1]; qpos/ws/sw: [n]; f*: [n, F]."""
    D = k.shape[-1]
    F = fslot.shape[1] if fslot is not None and fslot.dim() == 2 else 0
    if not has_side:
        side, sw = k, ws  # unused pointers
    if F == 0:
        fslot = fsrc = fpos = ws
    _kv_update_kernel[(1 + F,)](
        qkv, q_out, k, v, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos,
        k.stride(0), side.stride(0),
        HQ=n_heads, HKV=n_kv, HQP=triton.next_power_of_2(n_heads), HKVP=triton.next_power_of_2(n_kv),
        D=D, F=max(F, 1), ROTATE_K=rotate_k, HAS_SIDE=has_side, num_warps=1 if D <= 64 else 2)


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
                       stride_kh, scale, C: tl.constexpr, SPLIT_LEN: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       NS: tl.constexpr, ROTATE_K: tl.constexpr):
    h = tl.program_id(0)  # KV head
    sp = tl.program_id(1)  # split of the keys
    HALF: tl.constexpr = D // 2
    g = tl.arange(0, GP)
    gm = g < G
    d = tl.arange(0, HALF)
    qrow = (h * G + g)[:, None] * D + d[None, :]
    q1 = tl.load(q_ptr + qrow, mask=gm[:, None], other=0.0)
    q2 = tl.load(q_ptr + qrow + HALF, mask=gm[:, None], other=0.0)
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc1 = tl.zeros([GP, HALF], tl.float32)
    acc2 = tl.zeros([GP, HALF], tl.float32)
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, C)
    for i in range(0, SPLIT_LEN, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        nm = n < end
        ok = nm & (tl.load(valid_ptr + n, mask=nm, other=0) != 0)
        kp = k_ptr + h * stride_kh + n[:, None] * D + d[None, :]
        k1 = tl.load(kp, mask=nm[:, None], other=0.0)
        k2 = tl.load(kp + HALF, mask=nm[:, None], other=0.0)
        if ROTATE_K:  # static layout: key n sits at position n (StreamingLLM's contiguous positions)
            cs = tl.load(cos_ptr + n[:, None] * D + d[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + n[:, None] * D + d[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            k1 = (k1f * cs - k2f * sn).to(k_ptr.dtype.element_ty)
            k2 = (k2f * cs + k1f * sn).to(k_ptr.dtype.element_ty)
        s = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vp = v_ptr + h * stride_kh + n[:, None] * D + d[None, :]
        v1 = tl.load(vp, mask=nm[:, None], other=0.0)
        v2 = tl.load(vp + HALF, mask=nm[:, None], other=0.0)
        pv = p.to(v1.dtype)
        acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1)
        acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2)
        m_i = m_new
    row = (h * G + g) * NS + sp
    tl.store(m_ptr + row, m_i, mask=gm)
    tl.store(l_ptr + row, l_i, mask=gm)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc1, mask=gm[:, None])
    tl.store(acc_ptr + row[:, None] * D + HALF + d[None, :], acc2, mask=gm[:, None])


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, NS: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr):
    hq = tl.program_id(0)
    sp = tl.arange(0, NSP)
    sm = sp < NS
    m = tl.load(m_ptr + hq * NS + sp, mask=sm, other=-1.0e30)
    l = tl.load(l_ptr + hq * NS + sp, mask=sm, other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    w = tl.where(sm, w, 0.0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (hq * NS + sp)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
    tl.store(o_ptr + hq * D + d, o.to(o_ptr.dtype.element_ty))


class DecodeAttention:
    """Split-KV decode attention over one layer's slot cache, with its scratch buffers allocated once
    (static addresses: capturable)."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, capacity: int, device, dtype,
                 rotate_k: bool = False, block_n: int = 32, n_sm: int | None = None):
        # (A CUDA-core variant for MHA, G = 1, without the tensor-core dot padded to 16 query rows,
        # measured 9% slower on the 7B shape on an H100: 733 vs 671 us per token; not kept.)
        if n_sm is None:
            n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        self.G = n_heads // n_kv
        self.n_heads, self.n_kv, self.D, self.C = n_heads, n_kv, head_dim, capacity
        self.block_n = block_n
        n_blocks = triton.cdiv(capacity, block_n)
        self.ns = max(1, min(n_blocks, triton.cdiv(2 * n_sm, n_kv)))
        self.split_len = triton.cdiv(n_blocks, self.ns) * block_n
        self.ns = triton.cdiv(capacity, self.split_len)
        self.rotate_k = rotate_k
        self.m = torch.empty(n_heads * self.ns, device=device, dtype=torch.float32)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_heads * self.ns, head_dim, device=device, dtype=torch.float32)
        self.out = torch.empty(n_heads, head_dim, device=device, dtype=dtype)

    def __call__(self, q, k, v, valid, scale: float, cos=None, sin=None):
        """q: [Hq, D] (rotated); k, v: [Hkv, slots >= C, D]; valid: [>= C] bool -> [Hq, D] (a reused buffer)."""
        cos = k if cos is None else cos
        sin = k if sin is None else sin
        _attn_split_kernel[(self.n_kv, self.ns)](
            q, k, v, valid, cos, sin, self.m, self.l, self.acc, k.stride(0), scale, C=self.C,
            SPLIT_LEN=self.split_len, G=self.G, GP=max(16, triton.next_power_of_2(self.G)), D=self.D, BLOCK_N=self.block_n, NS=self.ns,
            ROTATE_K=self.rotate_k, num_warps=4 if self.D <= 64 else 8, num_stages=2)
        _attn_reduce_kernel[(self.n_heads,)](self.m, self.l, self.acc, self.out, NS=self.ns,
                                              NSP=triton.next_power_of_2(self.ns), D=self.D, num_warps=1)
        return self.out
