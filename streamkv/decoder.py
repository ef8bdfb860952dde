"""The decode path, gpt-fast style: a plain forward over a HF model's own modules (norms, MLPs,
projections) with attention written here, so that a cache manager decides which keys are
attended and at which RoPE positions. This module (with models.py) is the only place that knows
the HF model layouts; it uses no HF cache class, so transformers' cache API churn cannot break it.

Supported: the families of streamkv/backends/families.py: the Llama family (Llama, Mistral, Qwen2,
Qwen3, SmolLM2; GQA) and GPT-NeoX (Pythia; partial rotary, parallel residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from streamkv.backends.families import FAMILIES, family_error
from streamkv.backends.functional import attend

SUPPORTED_ARCHS = tuple(FAMILIES)


class RotaryTable:
    """cos/sin per position, computed in float64 then cast, so that RoPE stays exact at 20k+
    positions (float32 angles pos*inv_freq lose ~1e-3 rad there; see tests/test_rope.py)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int, dtype: torch.dtype):
        pos = torch.arange(max_positions, dtype=torch.float64, device=inv_freq.device)
        angles = torch.outer(pos, inv_freq.to(torch.float64))
        emb = torch.cat([angles, angles], dim=-1)
        self.cos = (emb.cos() * scaling).to(dtype)
        self.sin = (emb.sin() * scaling).to(dtype)
        self.rotary_dim = emb.shape[-1]

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D]; positions: [T] (may be negative only by mistake: callers keep them >= 0)."""
        cos = self.cos[positions]  # [T, rot]
        sin = self.sin[positions]
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


@dataclass
class ModelShape:
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int


class Decoder:
    """Runs the model over new tokens; the cache manager supplies keys/values and positions.

    `forward(ids, cache)` calls, per step: `cache.begin(n_new)` -> RoPE positions of the new
    tokens; per layer `cache.update(layer, k, v, rope)` -> (keys rotated, values, mask) to attend;
    finally `cache.end()`. Keys arrive un-rotated: the manager rotates them (StreamingLLM re-rotates
    every step; the ring manager rotates once and re-rotates only sinks).
    """

    def __init__(self, hf_model, max_positions: int):
        arch = hf_model.config.model_type
        if arch not in SUPPORTED_ARCHS:
            raise NotImplementedError(family_error(arch, None, "this model"))
        self.model = hf_model
        cfg = hf_model.config
        self.arch = "neox" if arch == "gpt_neox" else "llama"
        base = hf_model.gpt_neox if self.arch == "neox" else hf_model.model
        self.base = base
        self.layers = list(base.layers)
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        self.shape = ModelShape(arch, len(self.layers), n_heads, n_kv, head_dim, cfg.vocab_size)
        self.scale = head_dim ** -0.5
        rotary = base.rotary_emb
        dtype = next(hf_model.parameters()).dtype
        self.rope = RotaryTable(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)),
                                max_positions, dtype)
        # optional hook for score-based policies: f(layer, q_rot, k_rot, mask) after each attention
        self.attention_observer: Optional[Callable] = None
        # optional hook for backends (every family): an object with qkv(i, x) -> (q, k, v) [B, H, T, D]
        # (input norm + projections) and out(i, x, attn) -> x (o_proj, residuals, norm, MLP); see
        # streamkv/backends. None = the HF modules, as above.
        self.dense = None

    @property
    def dtype(self) -> torch.dtype:
        return self.rope.cos.dtype

    def _qkv(self, layer, h: torch.Tensor):
        B, T, _ = h.shape
        s = self.shape
        if self.arch == "neox":
            qkv = layer.attention.query_key_value(h).view(B, T, s.n_heads, 3 * s.head_dim).transpose(1, 2)
            return qkv.chunk(3, dim=-1)
        attn = layer.self_attn
        q = attn.q_proj(h).view(B, T, s.n_heads, s.head_dim)
        k = attn.k_proj(h).view(B, T, s.n_kv_heads, s.head_dim)
        v = attn.v_proj(h).view(B, T, s.n_kv_heads, s.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attention(self, i: int, layer, h: torch.Tensor, cache, q_pos: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(layer, h)
        out = self._attend(i, q, k, v, cache, q_pos)
        return layer.attention.dense(out) if self.arch == "neox" else layer.self_attn.o_proj(out)

    def _attend(self, i: int, q, k, v, cache, q_pos: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, T, D], un-rotated -> attention output [B, T, H*D] (before the output projection)."""
        B, _, T, _ = q.shape
        k_all, v_all, mask = cache.update(i, k, v, self.rope)
        q = self.rope.rotate(q, q_pos)
        if self.attention_observer is not None:
            # keys (and mask) in cache order whatever the manager's slot layout (identity for concat)
            self.attention_observer(i, q, cache.to_cache_order(k_all, 2),
                                    None if mask is None else cache.to_cache_order(mask, -1))
        out = attend(q, k_all, v_all, self.scale, mask=mask, gqa=self.shape.n_kv_heads != self.shape.n_heads)
        return out.transpose(1, 2).reshape(B, T, -1)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """ids: [1, T] -> logits [1, T, vocab]."""
        q_pos = cache.begin(ids.shape[1])
        self.q_pos = q_pos  # the step's RoPE positions (score-based policies read them in their observer)
        neox = self.arch == "neox"
        x = (self.base.embed_in if neox else self.base.embed_tokens)(ids)
        for i, layer in enumerate(self.layers):
            if self.dense is not None:  # a backend's dense blocks (compiled / fused kernels, any family);
                q, k, v = self.dense.qkv(i, x)  # attention stays with the cache manager
                x = self.dense.out(i, x, self._attend(i, q, k, v, cache, q_pos))
            elif neox:
                attn = self._attention(i, layer, layer.input_layernorm(x), cache, q_pos)
                if layer.use_parallel_residual:
                    x = x + attn + layer.mlp(layer.post_attention_layernorm(x))
                else:
                    x = x + attn
                    x = x + layer.mlp(layer.post_attention_layernorm(x))
            else:
                x = x + self._attention(i, layer, layer.input_layernorm(x), cache, q_pos)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = (self.base.final_layer_norm if neox else self.base.norm)(x)
        logits = self.model.get_output_embeddings()(x)
        cache.end()
        return logits
