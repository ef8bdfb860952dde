"""The fast backends' building blocks for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2):
the weights gathered once from the HF model, and one layer's dense work as plain functions.

`gather_weights` concatenates q/k/v and gate/up weights into one tensor each (one matmul instead of
three or two) and points the HF modules' parameters at views of it, so that nothing is stored twice
and the HF model (eager path, HF baselines) keeps working unchanged. The functions below reproduce
the HF modules' arithmetic (RMSNorm in float32 then cast, SiLU-gated MLP), so the eager and fast
paths differ only by matmul rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # input RMSNorm
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) D, hidden]
    bqkv: Optional[torch.Tensor]  # Qwen2 has q/k/v biases
    q_norm: Optional[torch.Tensor]  # Qwen3: per-head RMSNorm of q and k before RoPE
    k_norm: Optional[torch.Tensor]
    wo: torch.Tensor
    ln2: torch.Tensor  # post-attention RMSNorm
    wgu: torch.Tensor  # [2 I, hidden]: gate rows, then up rows
    wd: torch.Tensor  # [hidden, I]


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list
    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


def check_llama_like(hf_model, backend: str) -> None:
    arch = hf_model.config.model_type
    act = getattr(hf_model.config, "hidden_act", "silu")
    if arch not in LLAMA_LIKE or act != "silu":
        raise NotImplementedError(f"backend: '{backend}' supports the Llama family ({', '.join(LLAMA_LIKE)}, "
                                  f"SiLU MLP); this model is '{arch}' ({act}): use backend=eager")


def _fuse_rows(modules, attr: str) -> Optional[torch.Tensor]:
    """One tensor holding the modules' `attr` stacked along dim 0; the modules keep views of it."""
    parts = [getattr(m, attr) for m in modules]
    if parts[0] is None:
        return None
    fused = getattr(modules[0], f"_streamkv_fused_{attr}", None)
    if fused is not None and fused.data_ptr() == parts[0].data_ptr():  # done before, still shared
        return fused
    fused = torch.cat([p.detach() for p in parts])
    offset = 0
    for m, p in zip(modules, parts):
        n = p.shape[0]
        setattr(m, attr, torch.nn.Parameter(fused[offset:offset + n], requires_grad=False))
        offset += n
    object.__setattr__(modules[0], f"_streamkv_fused_{attr}", fused)  # plain attribute, not a buffer
    return fused


@torch.no_grad()
def gather_weights(hf_model, backend: str = "fast") -> ModelWeights:
    check_llama_like(hf_model, backend)
    cfg = hf_model.config
    base = hf_model.model
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    layers = []
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        proj = [attn.q_proj, attn.k_proj, attn.v_proj]
        layers.append(LayerWeights(
            ln1=layer.input_layernorm.weight, wqkv=_fuse_rows(proj, "weight"), bqkv=_fuse_rows(proj, "bias"),
            q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
            wo=attn.o_proj.weight, ln2=layer.post_attention_layernorm.weight,
            wgu=_fuse_rows([mlp.gate_proj, mlp.up_proj], "weight"), wd=mlp.down_proj.weight))
    return ModelWeights(embed=base.embed_tokens.weight, layers=layers, norm=base.norm.weight,
                        lm_head=hf_model.get_output_embeddings().weight, eps=float(cfg.rms_norm_eps),
                        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)


# ---------------------------------------------------------------- plain functions (HF arithmetic)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] rotated by cos/sin [T, D] (the RotaryTable layout: halves duplicated)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def qkv_proj(x, ln1, wqkv, bqkv, q_norm, k_norm, eps: float, n_heads: int, n_kv: int, head_dim: int):
    """Input RMSNorm + fused q/k/v projection: x [B, T, hidden] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]
    (un-rotated)."""
    B, T, _ = x.shape
    qkv = F.linear(rms_norm(x, ln1, eps), wqkv, bqkv)
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q, k, v = q.view(B, T, n_heads, head_dim), k.view(B, T, n_kv, head_dim), v.view(B, T, n_kv, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attn_out_mlp(x, attn, wo, ln2, wgu, wd, eps: float):
    """Output projection + residual, then post-attention RMSNorm + SiLU-gated MLP + residual."""
    x = x + F.linear(attn, wo)
    gate, up = F.linear(rms_norm(x, ln2, eps), wgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wd)


class DenseBlocks:
    """Decoder.dense for the host-driven path: the two dense halves of a layer, each one function of
    tensors (so one compiled graph serves every layer)."""

    def __init__(self, weights: ModelWeights, qkv_fn=qkv_proj, out_fn=attn_out_mlp):
        self.w, self._qkv, self._out = weights, qkv_fn, out_fn

    def qkv(self, i: int, x):
        lw, w = self.w.layers[i], self.w
        return self._qkv(x, lw.ln1, lw.wqkv, lw.bqkv, lw.q_norm, lw.k_norm, w.eps, w.n_heads, w.n_kv_heads,
                         w.head_dim)

    def out(self, i: int, x, attn):
        lw = self.w.layers[i]
        return self._out(x, attn, lw.wo, lw.ln2, lw.wgu, lw.wd, self.w.eps)


def score(logits: torch.Tensor, targets: torch.Tensor, top1: bool = False):
    """Per-position NLL and predictive entropy (float32) of `targets` under `logits` [T, V]; with
    top1=True also whether each target is the top-1 prediction (bool; a tie with the maximum counts)."""
    logp = logits.float().log_softmax(-1)
    target_logp = logp.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    if not top1:
        return -target_logp, entropy
    return -target_logp, entropy, target_logp >= logp.amax(-1)
