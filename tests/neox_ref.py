"""A tiny random GPT-NeoX (head dim 80, its biases and LayerNorms moved away from HF's init so that they
count) and its own per-token NLL: the reference the fused GPT-NeoX steps are checked against (imported by
the interpreter scripts of tests/test_fused_neox.py)."""

from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from streamkv.models import ByteTokenizer


def tiny_neox(rotary_pct: float = 0.25, parallel: bool = True) -> GPTNeoXForCausalLM:
    cfg = GPTNeoXConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=160, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
                        rotary_pct=rotary_pct, use_parallel_residual=parallel, tie_word_embeddings=False,
                        initializer_range=0.1)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorms to identity: make them count
        for prm in model.parameters():
            if prm.dim() == 1:
                prm.add_(torch.randn_like(prm) * 0.2)
    return model


def hf_nll(model, ids):
    """The model's own forward: per-token NLL of ids[1:] (numpy)."""
    with torch.inference_mode():
        logp = model(ids[None]).logits[0].float().log_softmax(-1)
    return (-logp[:-1].gather(-1, ids[1:, None])[:, 0]).numpy()
