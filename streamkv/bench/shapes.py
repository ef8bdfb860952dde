"""The benchmarked models: SmolLM2-135M (real weights) or a random-weight model of a named shape (Llama
shapes; GPT-NeoX with pythia-2.8b's shape, float16 on CUDA), the text they read, and the bytes one decode
step must read (the roofline's numerator)."""

from __future__ import annotations

import torch

from streamkv.config import ModelConfig
from streamkv.corpora import load_text
from streamkv.models import ByteTokenizer, converted_smollm2_dir, load_model

# Llama shapes for the random-weight models (TinyLlama-1.1B, Llama-2-7B).
SHAPES = {
    # SmolLM2-135M's shape with random weights: the same TPOT as the real model (timings do not depend on
    # the values), for a GPU machine that has no copy of the real weights
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}

# GPT-NeoX (Pythia) shapes. pythia-2.8b's config.json (EleutherAI/pythia-2.8b): head dim 80, rotary_pct 0.25
# (20 rotary dims)
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
# the dtype the GPT-NeoX models are benchmarked in on CUDA (Pythia ships float16); CPU runs stay float32
NEOX_DTYPE = torch.float16


def is_neox_bench(name: str) -> bool:
    return name in NEOX_SHAPES


def bench_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return NEOX_DTYPE if is_neox_bench(name) and device.type == "cuda" else dtype


def load_bench_model(name: str, device: torch.device, dtype: torch.dtype):
    """(hf_model, tokenizer or None, info)."""
    if is_neox_bench(name):
        return load_neox_model(name, device, dtype)
    if name == "smollm2":
        from omegaconf import OmegaConf

        loaded = load_model(OmegaConf.structured(ModelConfig(name="smollm2_135m", kind="gguf")), device, dtype)
        return loaded.model, loaded.tokenizer, {"weights": "real (SmolLM2-135M-Instruct GGUF, dequantized)"}
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"tie_word_embeddings": False, **SHAPES[name]}
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    return model, None, {"weights": "random (Llama config, HF init)"}


def load_neox_model(name: str, device: torch.device, dtype: torch.dtype):
    """(hf_model, None, info): random weights (HF's init), built on the device."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**NEOX_SHAPES[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    return model, None, {"weights": "random (GPT-NeoX config, HF init)"}


def bench_ids(n: int, vocab: int, tokenizer) -> torch.Tensor:
    tok = tokenizer if tokenizer is not None else _smollm2_tokenizer() or ByteTokenizer()
    ids = tok.encode(load_text("wiki"))
    while len(ids) < n:  # only for very long requests: repeat the text
        ids = ids + ids
    return torch.tensor(ids[:n], dtype=torch.long) % vocab


def _smollm2_tokenizer():
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(converted_smollm2_dir()))
    except Exception:  # offline machine without the converted checkpoint: byte ids
        return None


def weight_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes one decode step reads: all but an embedding table that is not the head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    read = total - (emb.numel() * emb.element_size() if emb.data_ptr() != head.data_ptr() else 0)
    return total, read


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * n_kv * head_dim * next(model.parameters()).element_size()
