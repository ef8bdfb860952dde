"""Model families as data: what a family's decoder layer differs in, said once per family, and the
weights gathered from a HF model into one family-neutral form (ModelWeights) that the fast paths'
single decode step reads (streamkv/backends/functional.py, graph.py).

A family description names the HF modules (attribute paths) and says how the layer computes:
norm kind (RMSNorm / LayerNorm with bias), MLP (SiLU-gated / plain activation, biases where the
modules have them), q/k/v layout, q/k norms, residual form (the config key that switches it); the
rotary fraction and base, eps and tying come from the model's own config (`describe`). Adding a
family = one entry in FAMILIES (+ a tiny test model in streamkv/models.py).

GPT-NeoX's fused `query_key_value` is laid out per head ([H, (q, k, v), D] rows). We keep that layout
and split with a view in the step (functional.qkv_proj) instead of permuting the rows once into
Llama's [all q | all k | all v]: the HF module must keep working on the same storage (eager path, HF
baselines), and a row permutation of a [3HD, hidden] weight is not expressible as a strided 2-D view,
so the HF parameter could not stay a view of a permuted tensor: nothing would be shared, the weight
would be stored twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Family:
    """One family's decoder layer. Module names are attribute paths: `base` from the CausalLM,
    `embed`/`final_norm` from the base, the rest from one decoder layer."""

    name: str
    base: str
    embed: str
    final_norm: str
    ln1: str
    ln2: str
    qkv: tuple  # q, k, v projections (Llama-like), or the one fused projection (GPT-NeoX)
    o: str
    mlp_in: tuple  # gate, up (gated MLP) or the one input projection
    mlp_out: str
    act: str  # the HF activation module (exact HF arithmetic: its own forward)
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    gated: bool = True  # act(gate) * up; False: act(x W_in + b)
    qkv_layout: str = "grouped"  # grouped: rows [all q | all k | all v]; per_head: rows [H, (q, k, v), D]
    qk_norm: Optional[tuple] = None  # Qwen3: per-head RMSNorm of q and k before RoPE
    parallel_residual_key: Optional[str] = None  # config key of x + attn(ln1 x) + mlp(ln2 x); None: sequential
    eps_key: str = "rms_norm_eps"
    # filled per model by `describe` (from the config and the rotary module)
    parallel_residual: bool = False
    rotary_ndims: int = 0  # RoPE on the first rotary_ndims dims of each head (= head_dim: full rotary)
    rope_base: float = 10000.0
    eps: float = 1e-6
    hidden_act: str = "silu"
    tied: bool = False


_LLAMA = dict(base="model", embed="embed_tokens", final_norm="norm", ln1="input_layernorm",
              ln2="post_attention_layernorm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              o="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", act="mlp.act_fn")

FAMILIES = {
    "llama": Family(name="llama", **_LLAMA),
    "mistral": Family(name="mistral", **_LLAMA),
    "qwen2": Family(name="qwen2", **_LLAMA),  # q/k/v biases: taken where the modules have them
    "qwen3": Family(name="qwen3", **_LLAMA, qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
    "gpt_neox": Family(name="gpt_neox", base="gpt_neox", embed="embed_in", final_norm="final_layer_norm",
                       ln1="input_layernorm", ln2="post_attention_layernorm", qkv=("attention.query_key_value",),
                       o="attention.dense", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
                       act="mlp.act", norm="layer", gated=False, qkv_layout="per_head",
                       parallel_residual_key="use_parallel_residual", eps_key="layer_norm_eps"),
}

# Which backends run which families. The host-driven dense path (compile) and the PyTorch graph step
# (cudagraph) are family-neutral; the fused kernels (liger RMSNorm / SwiGLU, our Triton RoPE + attention)
# cover what this table lists. Also checked per model at gather time (`check_backend_model`).
ALL_BACKENDS = ("eager", "compile", "fused", "cudagraph", "cudagraph_fused", "cudagraph_fused_gemv")
BACKEND_FAMILIES = {
    "eager": tuple(FAMILIES),
    "compile": tuple(FAMILIES),
    "cudagraph": tuple(FAMILIES),
    "fused": ("llama", "mistral", "qwen2", "qwen3"),
    "cudagraph_fused": ("llama", "mistral", "qwen2", "gpt_neox"),  # gpt_neox: its step in fused_neox.py
    "cudagraph_fused_gemv": ("llama", "mistral", "qwen2", "gpt_neox"),
}


def backends_for(model_type: str) -> tuple:
    return tuple(b for b in ALL_BACKENDS if model_type in BACKEND_FAMILIES[b])


def family_error(model_type: str, backend: Optional[str], what: str) -> Optional[str]:
    """One line if `backend` (None: any) cannot run a `model_type` model, else None."""
    if model_type not in FAMILIES:
        return (f"model: {what} is a '{model_type}' model; streamkv runs the families {', '.join(FAMILIES)} "
                f"(backends eager, compile, cudagraph; fused kernels: llama, mistral, qwen2; cudagraph_fused and "
                f"cudagraph_fused_gemv also gpt_neox)")
    if backend is not None and model_type not in BACKEND_FAMILIES.get(backend, tuple(FAMILIES)):
        fams = BACKEND_FAMILIES[backend]
        label = "the Llama family only" if set(fams) <= {"llama", "mistral", "qwen2", "qwen3"} else "the families"
        return (f"backend: '{backend}' supports {label} ({', '.join(fams)}); {what} is '{model_type}': use "
                f"backend={' or '.join(backends_for(model_type))}")
    return None


def local_model_type(path: Optional[str]) -> Optional[str]:
    """model_type from a local directory's config.json (None: not a local dir, e.g. a hub id)."""
    if not path:
        return None
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return str(json.loads(cfg.read_text()).get("model_type"))
    except (OSError, ValueError):
        return None


def describe(hf_model) -> Family:
    """The family description of this model, with its config's values filled in."""
    cfg = hf_model.config
    fam = FAMILIES.get(cfg.model_type)
    if fam is None:
        raise NotImplementedError(family_error(cfg.model_type, None, "this model"))
    rotary = getattr(hf_model, fam.base).rotary_emb
    rope = getattr(cfg, "rope_parameters", None) or {}
    return dataclasses.replace(
        fam, parallel_residual=bool(getattr(cfg, fam.parallel_residual_key)) if fam.parallel_residual_key else False,
        rotary_ndims=2 * rotary.inv_freq.shape[0], rope_base=float(rope.get("rope_theta", 10000.0)),
        eps=float(getattr(cfg, fam.eps_key)), hidden_act=str(getattr(cfg, "hidden_act", "silu")),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)))


# ---------------------------------------------------------------- the gathered weights


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # input norm weight (bias: ln1_b, LayerNorm only)
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) D, hidden], rows in the family's qkv_layout
    bqkv: Optional[torch.Tensor]  # Qwen2, GPT-NeoX
    q_norm: Optional[torch.Tensor]  # Qwen3: per-head RMSNorm of q and k before RoPE
    k_norm: Optional[torch.Tensor]
    wo: torch.Tensor
    ln2: torch.Tensor  # post-attention norm (GPT-NeoX parallel residual: the MLP's norm of the layer input)
    wgu: torch.Tensor  # MLP input: [2 I, hidden] gate rows then up rows (gated), or [I, hidden]
    wd: torch.Tensor  # [hidden, I]
    ln1_b: Optional[torch.Tensor] = None
    ln2_b: Optional[torch.Tensor] = None
    bo: Optional[torch.Tensor] = None
    bgu: Optional[torch.Tensor] = None
    bd: Optional[torch.Tensor] = None


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
    family: Optional[Family] = None
    act: Any = None  # the HF activation module (callable)
    norm_b: Optional[torch.Tensor] = None
    lm_head_b: Optional[torch.Tensor] = None

    @property
    def rotary_ndims(self) -> int:
        return self.family.rotary_ndims if self.family is not None else self.head_dim


def _fuse_rows(modules, attr: str) -> Optional[torch.Tensor]:
    """One tensor holding the modules' `attr` stacked along dim 0; the modules keep views of it."""
    parts = [getattr(m, attr) for m in modules]
    if parts[0] is None:
        return None
    if len(parts) == 1:  # nothing to fuse: the module's own tensor
        return parts[0].detach()
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


def _param(module, attr: str) -> Optional[torch.Tensor]:
    p = getattr(module, attr, None)
    return None if p is None else p.detach()


def check_backend_model(fam: Family, w: "ModelWeights", backend: str) -> None:
    """What the config-time check cannot see. The Llama family's fused kernels need a SiLU-gated MLP,
    full rotary (graph paths) and no output/MLP biases (they are not applied there); GPT-NeoX's fused step
    (a LayerNorm family on cudagraph_fused / cudagraph_fused_gemv, streamkv/backends/fused_neox.py) applies every bias and
    partial rotary but fuses only the exact (erf) GELU."""
    if backend not in ("fused", "cudagraph_fused", "cudagraph_fused_gemv"):
        return
    err = family_error(fam.name, backend, "this model")
    if err is None and fam.norm == "layer":
        if fam.gated or fam.hidden_act != "gelu":
            err = (f"backend: '{backend}' fuses GPT-NeoX's exact (erf) GELU only; this model's activation is "
                   f"'{fam.hidden_act}': use backend=cudagraph or backend=eager")
    elif err is None:
        if fam.hidden_act != "silu":
            err = f"backend: '{backend}' fuses SiLU-gated MLPs; this model's activation is '{fam.hidden_act}'"
        elif any(b is not None for lw in w.layers for b in (lw.bo, lw.bgu, lw.bd)):
            err = f"backend: '{backend}' does not apply output/MLP biases; use backend=cudagraph"
        elif backend != "fused" and fam.rotary_ndims != w.head_dim:
            err = (f"backend: '{backend}' rotates full heads; this model rotates {fam.rotary_ndims} of "
                   f"{w.head_dim} dims")
    if err is not None:
        raise NotImplementedError(err)


@torch.no_grad()
def gather_weights(hf_model, backend: str = "fast") -> ModelWeights:
    """ModelWeights of `hf_model`, sharing storage with it: q/k/v (and gate/up) rows are concatenated
    once into one tensor and the HF modules' parameters become views of it (nothing stored twice; the
    HF model keeps working unchanged)."""
    fam = describe(hf_model)
    cfg = hf_model.config
    base = getattr(hf_model, fam.base)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    layers = []
    for layer in base.layers:
        get = lambda path: attrgetter(path)(layer)  # noqa: E731
        proj, mlp_in = [get(p) for p in fam.qkv], [get(p) for p in fam.mlp_in]
        ln1, ln2, o, down = get(fam.ln1), get(fam.ln2), get(fam.o), get(fam.mlp_out)
        layers.append(LayerWeights(
            ln1=ln1.weight.detach(), ln1_b=_param(ln1, "bias"),
            wqkv=_fuse_rows(proj, "weight"), bqkv=_fuse_rows(proj, "bias"),
            q_norm=get(fam.qk_norm[0]).weight.detach() if fam.qk_norm else None,
            k_norm=get(fam.qk_norm[1]).weight.detach() if fam.qk_norm else None,
            wo=o.weight.detach(), bo=_param(o, "bias"), ln2=ln2.weight.detach(), ln2_b=_param(ln2, "bias"),
            wgu=_fuse_rows(mlp_in, "weight"), bgu=_fuse_rows(mlp_in, "bias"),
            wd=down.weight.detach(), bd=_param(down, "bias")))
    final = getattr(base, fam.final_norm)
    head = hf_model.get_output_embeddings()
    w = ModelWeights(embed=getattr(base, fam.embed).weight.detach(), layers=layers, norm=final.weight.detach(),
                     norm_b=_param(final, "bias"), lm_head=head.weight.detach(), lm_head_b=_param(head, "bias"),
                     eps=fam.eps, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, family=fam,
                     act=attrgetter(fam.act)(base.layers[0]))
    check_backend_model(fam, w, backend)
    return w
