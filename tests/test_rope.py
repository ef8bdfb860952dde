"""float32 precision of RoPE at 20k+ positions (docs/design.md, fact 2).

The ring / soft_ring / static managers rotate window keys at their TRUE text positions (20k and
beyond on long texts) while concat rotates at small StreamingLLM positions. That is only exact if
float32 RoPE at large positions is as good as at small ones. It is, with our tables (angles
computed in float64, cos/sin rounded once to float32: streamkv.decoder.RotaryTable); it would not be
with angles computed in float32 (pos * inv_freq rounds to ~1e-3 rad at 20000), as HF does.

Measured (head_dim 64, theta 1e4, q/k standard normal; error relative to |q||k|):
  score q.k, q at 20000+d / k at 20000 vs float64 truth:  ours 3.4e-8;  float32 angles 4.3e-5
  same, q/k energy in rotary pairs 1..4 (fast rotations):  ours 7.3e-8;  float32 angles 4.5e-4
  key rotated 20000 times by +1 (cumulative):  4.8e-4 off;  rotated once from a reference by the
  delta (what the managers do for sinks / refresh tokens): 4.5e-8.
"""

from __future__ import annotations

import torch

from streamkv.decoder import RotaryTable

D = 64
FAR = 20000
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
N_POS = FAR + 1000


def _tables():
    ours = RotaryTable(INV_FREQ, 1.0, N_POS, torch.float32)
    truth = RotaryTable(INV_FREQ, 1.0, N_POS, torch.float64)
    f32 = RotaryTable(INV_FREQ, 1.0, 2, torch.float32)  # then replaced by float32-computed angles
    angles = torch.outer(torch.arange(N_POS, dtype=torch.float32), INV_FREQ)
    emb = torch.cat([angles, angles], dim=-1)
    f32.cos, f32.sin = emb.cos(), emb.sin()
    return ours, truth, f32


def _score(table, q, k, q_pos, k_pos):
    dt = table.cos.dtype
    qr = table.rotate(q.to(dt), torch.tensor([q_pos]))
    kr = table.rotate(k.to(dt), torch.tensor([k_pos]))
    return float((qr * kr).sum())


def _worst_errors(band=None, trials=20):
    """Worst |score - truth| / (|q||k|) over random q, k and distances, for
    (ours far, ours near, float32-angles far)."""
    ours, truth, f32 = _tables()
    g = torch.Generator().manual_seed(0)
    worst = [0.0, 0.0, 0.0]
    for _ in range(trials):
        q = torch.randn(1, 1, 1, D, generator=g)
        k = torch.randn(1, 1, 1, D, generator=g)
        if band is not None:  # energy only in these rotary pairs
            m = torch.zeros(D)
            m[band] = 1
            m[D // 2 + band.start:D // 2 + band.stop] = 1
            q, k = q * m, k * m
        norm = float(q.norm() * k.norm())
        for d in (1, 7, 100, 500):
            exact = _score(truth, q, k, d, 0)  # float64: the truth (distance d)
            got = [_score(ours, q, k, FAR + d, FAR), _score(ours, q, k, d, 0), _score(f32, q, k, FAR + d, FAR)]
            worst = [max(w, abs(x - exact) / norm) for w, x in zip(worst, got)]
    return worst


def test_table_values_exact_at_large_positions():
    ours, truth, f32 = _tables()
    assert (ours.cos.double() - truth.cos).abs().max() < 1e-7  # one float32 rounding of cos/sin
    assert (ours.sin.double() - truth.sin).abs().max() < 1e-7
    assert (f32.cos.double() - truth.cos).abs().max() > 1e-4  # float32 angles: ~5e-4 at 20k


def test_scores_at_20k_match_scores_at_0():
    far, near, f32_far = _worst_errors()
    assert far < 1e-6 and near < 1e-6  # measured 3.4e-8 both: large positions cost nothing
    assert f32_far > 1e-5  # float32 angles: 4.3e-5


def test_scores_fast_rotary_pairs():
    far, near, f32_far = _worst_errors(band=slice(1, 5))
    assert far < 1e-6 and near < 1e-6  # measured 7e-8
    assert f32_far > 1e-4  # float32 angles: 4.5e-4, beyond the 1e-4 NLL tolerance of the managers


def test_rotation_by_delta_from_reference_vs_cumulative():
    """Why the managers keep a reference row for sinks / refresh tokens: rotating a stored key once
    by a delta is exact; rotating the stored row again every prune drifts."""
    ours, truth, _ = _tables()
    k = torch.randn(1, 1, 1, D, generator=torch.Generator().manual_seed(1))
    ref = truth.rotate(k.double(), torch.tensor([FAR]))
    once = ours.rotate(ours.rotate(k, torch.tensor([3])), torch.tensor([FAR - 3]))
    assert float((once.double() - ref).norm() / ref.norm()) < 1e-6  # measured 4.5e-8
    x = ours.rotate(k, torch.tensor([0]))
    one = torch.tensor([1])
    for _ in range(FAR):
        x = ours.rotate(x, one)
    assert float((x.double() - ref).norm() / ref.norm()) > 1e-4  # measured 4.8e-4
