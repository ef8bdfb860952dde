"""PyTorch references for the decode-attention kernel tests (imported inside their Triton-interpreter
subprocesses, which put tests/ on the path)."""

from __future__ import annotations

import torch

from streamkv.backends.functional import rope


def rope_tables(n: int, R: int):
    """cos/sin [n, R] (base 10000), float32, as the decode step's tables."""
    pos = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    emb = torch.cat([torch.outer(pos, inv)] * 2, -1)
    return emb.cos().float(), emb.sin().float()


def attention_case(Hq: int, Hkv: int, D: int, R: int, C: int, rot: bool):
    """Random q [Hq, D], k / v [Hkv, C + 1, D] and a valid mask (~30 % holes, slot 0 valid, the scratch slot C
    invalid), cos / sin of R rotary dims, and the reference output [Hq, D] (keys rotated at read when `rot`)."""
    q = torch.randn(Hq, D); k = torch.randn(Hkv, C + 1, D); v = torch.randn(Hkv, C + 1, D)  # noqa: E702
    valid = torch.rand(C + 1) > 0.3
    valid[C] = False
    valid[0] = True
    cos, sin = rope_tables(C + 1, R)
    kk = rope(k[:, :C], cos[:C], sin[:C]) if rot else k[:, :C]
    s = (q.view(Hkv, Hq // Hkv, D) @ kk.transpose(1, 2)) * D ** -0.5
    ref = (s.masked_fill(~valid[:C], float("-inf")).softmax(-1) @ v[:, :C]).reshape(Hq, D)
    return q, k, v, valid, cos, sin, ref
