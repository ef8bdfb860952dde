"""The `fused` backend: liger-kernel's Triton kernels in each layer's dense halves (CUDA).

  input RMSNorm                        -> LigerRMSNormFunction ("llama" casting: HF's arithmetic)
  o_proj + residual add + RMSNorm      -> one LigerFusedAddRMSNormFunction after the o_proj matmul
  SwiGLU over the fused gate/up output -> LigerFusedGateUpSiLUMulFunction (no chunk copies)

RoPE stays with the cache manager here: the manager rotates keys at positions of its own (concat
re-rotates the whole cache each step, ring only its sinks), which liger's RoPE kernel (q and k of the
same tokens, in place) does not express. The captured path fuses RoPE with its slot write in our own
kernel instead (streamkv/backends/triton_kernels.py says why).
Measured on an H100 (docs/benchmarks.md): this backend alone does not speed up decode (the
host-driven path is launch-bound at ~1300 launches per token); its kernels pay off inside
cudagraph_fused.
"""

from __future__ import annotations

import torch.nn.functional as F

from streamkv.backends.functional import DenseBlocks, ModelWeights


def _liger():
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError("backend=fused needs liger-kernel (pip install liger-kernel) and triton") from exc
    return LigerRMSNormFunction, LigerFusedAddRMSNormFunction, LigerFusedGateUpSiLUMulFunction


def fused_dense(weights: ModelWeights) -> DenseBlocks:
    RMSNorm, AddRMSNorm, SwiGLU = _liger()

    # the Llama family's arithmetic (RMSNorm, SiLU-gated MLP, sequential residual, no output/MLP biases):
    # gather_weights(..., "fused") refuses other models (families.BACKEND_FAMILIES, check_backend_model)
    def qkv(x, ln1, ln1_b, wqkv, bqkv, q_norm, k_norm, fam, n_heads, n_kv, head_dim):
        B, T, _ = x.shape
        eps = fam.eps
        h = RMSNorm.apply(x, ln1, eps, 0.0, "llama", False)
        q, k, v = F.linear(h, wqkv, bqkv).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        q, k, v = q.view(B, T, n_heads, head_dim), k.view(B, T, n_kv, head_dim), v.view(B, T, n_kv, head_dim)
        if q_norm is not None:
            q = RMSNorm.apply(q.contiguous(), q_norm, eps, 0.0, "llama", False)
            k = RMSNorm.apply(k.contiguous(), k_norm, eps, 0.0, "llama", False)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(x, attn, wo, bo, ln2, ln2_b, wgu, bgu, wd, bd, fam, act):
        eps = fam.eps
        h, x = AddRMSNorm.apply(F.linear(attn, wo), x, ln2, eps, 0.0, "llama", False)
        return x + F.linear(SwiGLU.apply(F.linear(h, wgu)), wd)

    return DenseBlocks(weights, qkv, out)
