"""The GPT-NeoX (Pythia) case of streamkv.bench: a random-weight GPTNeoXForCausalLM with pythia-2.8b's
shape, in float16 (Pythia's dtype) on CUDA, through the same protocol and table as the Llama shapes:

    python -m streamkv.bench --models pythia-2.8b                   # GPU
    python -m streamkv.bench --smoke --models tiny-neox             # CPU plumbing (head dim 80, rotary 20)

Paths: the seed-style baseline (HF eager + DynamicCache + lazy prune by slicing the cache, exactly as for
the Llama shapes: HF's own positions, no re-rotation), HF StaticCache + torch.compile dense, and our graph
step at streaming R=32 (ring x cudagraph, ring x cudagraph_fused = streamkv/backends/fused_neox.py, and
static x cudagraph_fused). The roofline is bench.py's: weights without embed_in + the visible K/V.
"""

from __future__ import annotations

import torch

# pythia-2.8b's config.json (EleutherAI/pythia-2.8b): head dim 80, rotary_pct 0.25 (20 rotary dims)
NEOX_SHAPES = {
    "pythia-2.8b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                        vocab_size=50304, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                        layer_norm_eps=1e-5, hidden_act="gelu", max_position_embeddings=2048,
                        tie_word_embeddings=False),
    # the same structure at a CPU size: head dim 80, 20 rotary dims, biases, parallel residual
    "tiny-neox": dict(hidden_size=160, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=256, rotary_pct=0.25, use_parallel_residual=True, layer_norm_eps=1e-5,
                      hidden_act="gelu", max_position_embeddings=64, tie_word_embeddings=False),
}
# the dtype the model is benchmarked in on CUDA (Pythia ships float16); CPU runs stay float32
NEOX_DTYPE = torch.float16


def is_neox_bench(name: str) -> bool:
    return name in NEOX_SHAPES


def bench_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return NEOX_DTYPE if is_neox_bench(name) and device.type == "cuda" else dtype


def load_neox_model(name: str, device: torch.device, dtype: torch.dtype):
    """(hf_model, None, info): random weights (HF's init), built on the device."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**NEOX_SHAPES[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    return model, None, {"weights": "random (GPT-NeoX config, HF init)"}


def neox_cases(smoke: bool) -> list:
    from streamkv.bench import Case

    cases = [Case("seed-style (HF eager + DynamicCache)", "seed", profile=True),
             Case("HF StaticCache + torch.compile (dense)", "hf_static", profile=not smoke),
             Case("concat x eager", "ours", profile=False)]
    if smoke:  # un-captured graph step; the Triton kernels need TRITON_INTERPRET=1 on the CPU
        return cases + [Case("ring x cudagraph_fused (uncaptured on CPU)", "ours", "ring", "cudagraph_fused")]
    return cases + [Case("ring x cudagraph_fused", "ours", "ring", "cudagraph_fused", R=32, profile=True),
                    Case("ring x cudagraph", "ours", "ring", "cudagraph", R=32, profile=True),
                    Case("static x cudagraph_fused", "ours", "static", "cudagraph_fused", R=32)]
