"""GPT-NeoX on the fused graph path, through Triton's interpreter on the CPU (float32; skipped where triton
is not installed): the kernels for head dim 80 with partial rotary (20 dims) and the per-head [q k v]
layout against their PyTorch reference, and the whole fused layer stack (streamkv/backends/fused_neox.py)
against the HF model's own forward and against concat x eager with prunes, for rotary_pct 0.25 / 1.0 and
the parallel / sequential residual. Each runs in a subprocess with TRITON_INTERPRET=1 (set before triton
loads)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _interpret(script: str, timeout: int = 600, interpret: bool = True) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"PYTHONPATH": path, **({"TRITON_INTERPRET": "1"} if interpret else {})})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


@needs_triton
def test_neox_kernels_in_interpreter():
    _interpret("""
        import torch, torch.nn.functional as F
        from streamkv.backends.triton_kernels import DecodeAttention, add_layer_norm, bias_gelu, kv_update
        from streamkv.backends.functional import rope
        from attention_ref import attention_case, rope_tables as tables
        torch.manual_seed(0)
        torch.set_num_threads(1)
        # decode attention: head dim 80 (not a power of two), partial rotary at read (static) or none (ring),
        # GQA with full rotary, and a tiny head whose rotary halves are narrower than a tensor-core dot
        for Hq, Hkv, D, R, C, rot in [(3, 3, 80, 20, 70, True), (3, 3, 80, 20, 45, False), (4, 2, 80, 80, 40, True),
                                      (2, 2, 16, 4, 30, True)]:
            q, k, v, valid, cos, sin, ref = attention_case(Hq, Hkv, D, R, C, rot)
            for rows in (None, False, True):  # the default choice, and each kernel on every case
                att = DecodeAttention(Hq, Hkv, D, C, torch.device("cpu"), torch.float32, rotate_k=rot, block_n=16,
                                      n_sm=4, rotary_dim=R, rows=rows)
                assert att.ns > 1 and att.rows == ((R < D and not rot) if rows is None else rows)
                out = att(q, k, v, valid, D ** -0.5, cos if rot else None, sin if rot else None)
                assert ((out - ref).norm() / ref.norm()) < 1e-5, (Hq, Hkv, D, R, C, rot, rows)
        # kv_update: GPT-NeoX's per-head [q k v] layout with a bias, rotary_dim 20 of 80; the grouped layout
        # (Llama's) with full rotary at head dim 80
        n, F_, S, C = 20, 2, 3, 10
        for H, Hkv, D, R, layout, bias, rotate_k in [(3, 3, 80, 20, "per_head", True, True),
                                                      (3, 3, 80, 20, "per_head", True, False),
                                                      (3, 3, 80, 80, "per_head", False, True),
                                                      (4, 2, 80, 80, "grouped", True, True)]:
            qkv = torch.randn((H + 2 * Hkv) * D); b = torch.randn_like(qkv) if bias else None
            side0 = torch.randn(Hkv, S + 1, D)
            cos, sin = tables(100, R)
            step = torch.tensor([5]); qpos = torch.arange(n) * 3; ws = torch.arange(n) % C; sw = torch.arange(n) % (S + 1)
            fslot = torch.randint(0, C, (n, F_)); fsrc = torch.randint(0, S, (n, F_)); fpos = torch.randint(0, 90, (n, F_))
            fslot[5] = torch.tensor([7, 9]); fsrc[5] = torch.tensor([0, 2]); sw[5] = 1
            outs = []
            for nb in (1, Hkv):  # one program for every head; one per KV head (the GPT-NeoX GEMV step's form)
                K = torch.zeros(Hkv, C + 1, D); V = torch.zeros(Hkv, C + 1, D)
                side = side0.clone(); qo = torch.empty(H, D)
                kv_update(qkv, qo, K, V, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos, n_heads=H, n_kv=Hkv,
                          rotate_k=rotate_k, has_side=True, rotary_dim=R, qkv_layout=layout, bias=b, head_blocks=nb)
                outs.append((qo, K, V, side))
            assert all(torch.equal(a, b_) for a, b_ in zip(*outs)), (layout, "head_blocks")
            try:  # a block size that does not divide the head counts is refused
                kv_update(qkv, qo, K, V, side, cos, sin, step, qpos, ws, sw, fslot, fsrc, fpos, n_heads=H, n_kv=Hkv,
                          rotate_k=rotate_k, has_side=True, rotary_dim=R, qkv_layout=layout, bias=b,
                          head_blocks=Hkv + 1)
                raise AssertionError("head_blocks that does not divide the heads was accepted")
            except ValueError:
                pass
            qo, K, V, side = outs[0]
            full = qkv + b if bias else qkv
            if layout == "per_head":
                q, k, v = full.view(H, 3 * D).chunk(3, -1)
            else:
                q, k, v = full.split([H * D, Hkv * D, Hkv * D]); q, k, v = q.view(H, D), k.view(Hkv, D), v.view(Hkv, D)
            p = int(qpos[5])
            c, s = cos[p:p + 1], sin[p:p + 1]
            assert torch.allclose(qo, rope(q, c, s), atol=1e-5), layout
            assert torch.allclose(K[:, ws[5]], rope(k, c, s) if rotate_k else k, atol=1e-5), layout
            assert torch.equal(V[:, ws[5]], v) and torch.equal(side[:, 1], k)
            for f in range(F_):
                src, fp = side0[:, fsrc[5, f]], int(fpos[5, f])
                assert torch.allclose(K[:, fslot[5, f]], rope(src, cos[fp:fp + 1], sin[fp:fp + 1]), atol=1e-5)
            if R < D:  # the pass-through dims are the raw key's
                assert torch.equal(K[:, ws[5], R:], k[:, R:]) and torch.equal(qo[:, R:], q[:, R:])
        # the residual adds + one or two LayerNorms; bias + exact GELU
        N = 160
        x, o, m, bo, bm = (torch.randn(1, N) for _ in range(5))
        lns = [(torch.randn(N), torch.randn(N)) for _ in range(2)]
        for adds, ref in [(None, x), ([(o, bo)], x + o + bo), ([(o, None), (m, bm)], x + o + m + bm),
                          ([(o, bo), (m, bm)], x + o + bo + m + bm)]:
            for two in (False, True):
                xs, ha, hb = add_layer_norm(x, adds, lns[0], lns[1] if two else None, 1e-5)
                assert torch.allclose(xs, ref, atol=1e-5)
                assert torch.allclose(ha, F.layer_norm(ref, (N,), *lns[0], 1e-5), atol=1e-4)
                assert (hb is None) != two and (not two or torch.allclose(hb, F.layer_norm(ref, (N,), *lns[1], 1e-5), atol=1e-4))
        u = torch.randn(1, 2500) * 3; b = torch.randn(2500)
        assert torch.allclose(bias_gelu(u, b, block=1024), F.gelu(u + b), atol=1e-6)
        assert torch.allclose(bias_gelu(u), F.gelu(u), atol=1e-6)
        print("ok")
    """)


@needs_triton
def test_decode_attention_default_launch_in_interpreter():
    # the launch shapes chosen by default (no block_n / waves / warps given): MHA head dim 128 on the parts
    # kernel (block_n 16, ~8 programs per SM, 2 warps), both layouts, and partial rotary on the ring (rows)
    _interpret("""
        import torch
        from streamkv.backends.triton_kernels import DecodeAttention
        from attention_ref import attention_case
        torch.manual_seed(0)
        torch.set_num_threads(1)
        for Hq, Hkv, D, R, C, rot, launch in [(2, 2, 128, 128, 70, False, (False, 16, 8, 2)),
                                             (2, 2, 128, 128, 70, True, (False, 16, 8, 2)),
                                             (2, 2, 80, 20, 150, False, (True, 64, 8, 1))]:
            q, k, v, valid, cos, sin, ref = attention_case(Hq, Hkv, D, R, C, rot)
            att = DecodeAttention(Hq, Hkv, D, C, torch.device("cpu"), torch.float32, rotate_k=rot, n_sm=2,
                                  rotary_dim=R)
            assert (att.rows, att.block_n, att.waves, att.num_warps) == launch and att.ns > 1, (D, rot)
            out = att(q, k, v, valid, D ** -0.5, cos if rot else None, sin if rot else None)
            assert ((out - ref).norm() / ref.norm()) < 1e-5, (D, rot)
        # the rows kernel's head dim in two tiles where it is not a power of two (keys stored rotated): Pythia's 80
        # = 64 + 16 unpadded; the static layout (rotation at read) keeps one padded tile
        from streamkv.backends.triton_kernels import row_tiles
        assert att.row_tiles == (64, 16)  # the last case above: head dim 80 on the ring
        assert [row_tiles(D) for D in (80, 96, 112, 48, 64, 128)] == [(64, 16), (64, 32), (64, 64), (32, 16), (64, 0),
                                                                       (128, 0)]
        assert row_tiles(80, two=False) == (128, 0) and [row_tiles(D) for D in (6, 24)] == [(4, 2), (16, 8)]
        assert DecodeAttention(2, 2, 80, 40, torch.device("cpu"), torch.float32, rotate_k=True, n_sm=2, rotary_dim=20,
                               rows=True).row_tiles == (128, 0)  # the static layout rotates at read: one tile
        for Hq, Hkv, D, R, C in [(2, 2, 112, 16, 90), (4, 2, 48, 16, 70)]:  # a masked second tile; GQA
            q, k, v, valid, cos, sin, ref = attention_case(Hq, Hkv, D, R, C, False)
            att = DecodeAttention(Hq, Hkv, D, C, torch.device("cpu"), torch.float32, n_sm=2, rotary_dim=R, rows=True)
            assert att.row_tiles == row_tiles(D) and att.row_tiles[1] > 0 and att.ns > 1
            out = att(q, k, v, valid, D ** -0.5)
            assert ((out - ref).norm() / ref.norm()) < 1e-5, D
        print("ok")
    """)


# the layer-stack tests' script head: 44 random byte ids, a prefill of 20 (the models: tests/neox_ref.py)
NEOX_STACK_HEAD = """
        import numpy as np, torch
        from conftest import compose
        from neox_ref import hf_nll, tiny_neox
        from streamkv.backends.graph import GemvOptions, GraphEvaluator
        from streamkv.models import ByteTokenizer
        from streamkv.runner import make_evaluator
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ids = torch.randint(0, ByteTokenizer.vocab_size, (44,))
        P = 20"""


@needs_triton
def test_fused_neox_stack_in_interpreter():
    """The fused GPT-NeoX decode step (cudagraph_fused, un-captured) on tiny GPT-NeoX models with head dim 80:
    with everything kept (policy=full) it reproduces the HF model's own forward per token; under streaming
    with prunes (sink re-rotation over the rotary dims only) it reproduces concat x eager, ring and static."""
    _interpret(NEOX_STACK_HEAD + """
        for rotary_pct, parallel in [(0.25, True), (0.25, False), (1.0, True)]:
            model = tiny_neox(rotary_pct, parallel)
            assert model.gpt_neox.layers[0].attention.rotary_ndims == int(80 * rotary_pct)
            hf = hf_nll(model, ids)
            def ev(*ov):
                c = compose("model=tiny_neox", "progress=false", f"prefill_tokens={P}", *ov)
                return make_evaluator(c, model, len(ids), torch.device("cpu"))
            full = ("policy=full", "n_sink=4", "window=64")
            for layout in ("ring", "static"):
                g = GraphEvaluator(ev(*full), layout, fused=True, capture=False)
                assert g.w.family.name == "gpt_neox" and g.backend_used == "cudagraph_fused"
                r = g.run(ids, P)
                err = np.abs(r.nll - hf).max()
                assert err < 2e-5, (rotary_pct, parallel, layout, "full", err)
            stream = ("policy=streaming", "n_sink=4", "window=8", "compress_every=4")
            ref = ev(*stream).run(ids, P)
            assert len(ref.events) > 3
            for layout in ("ring", "static"):
                r = GraphEvaluator(ev(*stream), layout, fused=True, capture=False).run(ids, P)
                err = np.abs(r.nll - ref.nll).max()
                assert err < 2e-5, (rotary_pct, parallel, layout, "streaming", err)
                assert r.events == ref.events and (r.visible_kv == ref.visible_kv).all()
        print("ok")
    """)


@needs_triton
def test_neox_gemv_kernels_in_interpreter():
    """The GEMV prologue/epilogues the GPT-NeoX step uses (streamkv/backends/gemv_kernels.py): LayerNorm before
    the dot (with a masked K tail and several K chunks), bias and up to two residual rows after it, and the
    paired GEMV (query_key_value and dense_h_to_4h + bias + GELU in one launch, masked rows in either half),
    against PyTorch in float32."""
    _interpret("""
        import torch, torch.nn.functional as F
        from streamkv.backends.gemv_kernels import gemv, gemv_pair, layer_norm_gemv
        torch.manual_seed(0)
        torch.set_num_threads(1)
        for N, K, cfg in [(40, 160, (4, 32, 1)), (37, 100, (8, 64, 2)), (64, 256, None)]:
            x = torch.randn(1, K) * 2 + 0.7  # a mean away from 0: the centring counts
            g, b, W, bias = torch.randn(K), torch.randn(K), torch.randn(N, K), torch.randn(N)
            h = F.layer_norm(x, (K,), g, b, 1e-5)
            assert torch.allclose(layer_norm_gemv(x, g, b, W, 1e-5, config=cfg), h @ W.T, atol=1e-4, rtol=1e-4)
            y = layer_norm_gemv(x, g, b, W, 1e-5, bias, config=cfg)
            assert torch.allclose(y, h @ W.T + bias, atol=1e-4, rtol=1e-4), (N, K)
            e1, e2 = torch.randn(1, N), torch.randn(1, N)
            for adds in [(), (e1,), (e1, e2)]:
                ref = x @ W.T + bias + sum(adds, torch.zeros(1, N))
                assert torch.allclose(gemv(x, W, bias, adds=adds, config=cfg), ref, atol=1e-4, rtol=1e-4), len(adds)
        # two launch configs with different BLOCK_K: the pair runs both halves at the smaller one
        for N1, N2, K, cfgs in [(40, 72, 160, ((4, 32, 1), (8, 64, 2))), (37, 50, 100, ((8, 64, 2), (16, 32, 2))),
                                (48, 64, 256, None)]:
            x1, x2, W1, W2, b2 = torch.randn(1, K), torch.randn(1, K), torch.randn(N1, K), torch.randn(N2, K), torch.randn(N2)
            for bias, gelu in [(None, False), (b2, False), (b2, True)]:
                y1, y2 = gemv_pair(x1, W1, x2, W2, bias, gelu2=gelu, configs=cfgs)
                r2 = F.linear(x2, W2, bias)
                r2 = F.gelu(r2) if gelu else r2
                assert y1.shape == (1, N1) and y2.shape == (1, N2)
                assert torch.allclose(y1, x1 @ W1.T, atol=1e-4, rtol=1e-4), (N1, K)
                assert torch.allclose(y2, r2, atol=1e-4, rtol=1e-4), (N2, K, bias is not None, gelu)
        print("ok")
    """)


@needs_triton
def test_fused_neox_gemv_stack_in_interpreter():
    """cudagraph_fused_gemv on GPT-NeoX (un-captured): the residual adds in our GEMVs' epilogues and the final
    LayerNorm in embed_out's prologue reproduce the HF model's forward (policy=full) and concat x eager under
    streaming with prunes, for both residuals and rotary_pct 0.25 / 1.0; with the GEMV size limit (every GEMV
    or some of them back on the unfused kernels) and the LM head unfused too."""
    _interpret(NEOX_STACK_HEAD + """
        import streamkv.backends.gemv_kernels as gk
        gk.gemv_config = lambda N, K, n_sm=132: (256, 64, 4)  # few programs (the interpreter's speed), a K tail
        for rotary_pct, parallel in [(0.25, True), (0.25, False), (1.0, True)]:
            model = tiny_neox(rotary_pct, parallel)
            hf = hf_nll(model, ids)
            def ev(*ov):
                c = compose("model=tiny_neox", "progress=false", f"prefill_tokens={P}", *ov)
                return make_evaluator(c, model, len(ids), torch.device("cpu"))
            full = ("policy=full", "n_sink=4", "window=64")
            stream = ("policy=streaming", "n_sink=4", "window=8", "compress_every=4")
            ref = ev(*stream).run(ids, P)
            assert len(ref.events) > 3
            # max_bytes 0: every GEMV over the limit (cudagraph_fused's step); 150 kB: only dense under it (the
            # fallback per GEMV); lm_head=False: embed_out unfused
            for layout, opts in [("ring", GemvOptions()), ("static", GemvOptions()), ("ring", GemvOptions(max_bytes=0)),
                                 ("ring", GemvOptions(max_bytes=150_000)), ("static", GemvOptions(lm_head=False))]:
                g = GraphEvaluator(ev(*full), layout, fused=True, fused_gemv=True, capture=False, gemv=opts)
                assert g.backend_used == "cudagraph_fused_gemv"
                err = np.abs(g.run(ids, P).nll - hf).max()
                assert err < 2e-5, (rotary_pct, parallel, layout, opts, "full", err)
                r = GraphEvaluator(ev(*stream), layout, fused=True, fused_gemv=True, capture=False, gemv=opts).run(ids, P)
                err = np.abs(r.nll - ref.nll).max()
                assert err < 2e-5, (rotary_pct, parallel, layout, opts, "streaming", err)
                assert r.events == ref.events and (r.visible_kv == ref.visible_kv).all()
        print("ok")
    """)


# the scored-policy tests' script head: a tiny random GPT-NeoX (head dim 80, 20 rotary dims, parallel
# residual, biases perturbed away from zero) and n random byte ids
TINY_NEOX_SCORED = """
        import numpy as np, torch
        from conftest import compose
        from neox_ref import tiny_neox
        from streamkv.backends.graph import GraphEvaluator
        from streamkv.models import ByteTokenizer
        from streamkv.runner import make_evaluator
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ids = torch.randint(0, ByteTokenizer.vocab_size, ({n},))
        P = 20
        model = tiny_neox(0.25, True)"""


@needs_triton
def test_fused_neox_scored_and_online_policies_in_interpreter():
    """The fused GPT-NeoX step goes through the graph evaluator's shared attention (kv_update in the per-head
    layout with partial rotary, the scored policies' observation): tova / h2o / snapkv (original positions in
    the ring, shifted in the static layout) and the entropy-driven policies online (static) reproduce concat x
    eager: same events and visible lengths, NLL to 2e-5."""
    _interpret(TINY_NEOX_SCORED.format(n=60) + """
        def ev(*ov):
            c = compose("model=tiny_neox", "progress=false", f"prefill_tokens={P}", "n_sink=4", "window=12", *ov)
            return make_evaluator(c, model, len(ids), torch.device("cpu"))
        streaming = ev("policy=streaming", "compress_every=8").run(ids, P)
        cases = [("ring", ("policy=tova", "compress_every=8")), ("ring", ("policy=h2o", "compress_every=4")),
                 ("ring", ("policy=snapkv", "compress_every=8")),
                 ("static", ("policy=tova", "compress_every=8", "policy.positions=shift")),
                 ("static", ("policy=snapkv", "compress_every=8", "policy.positions=shift")),
                 ("static", ("policy=adaptive", "policy.mode=entropy", "policy.extra_slack=6")),
                 ("static", ("policy=refresh", "policy.refresh_budget=4", "policy.refresh_select=entropy",
                             "compress_every=8"))]
        for layout, pol in cases:
            ref = ev(*pol).run(ids, P)
            assert len(ref.events) > 3, pol
            if pol[0] == "policy=tova":  # the scores choose other tokens than streaming's window
                assert np.abs(ref.nll - streaming.nll).max() > 1e-3
            g = GraphEvaluator(ev(*pol), layout, fused=True, capture=False)
            r = g.run(ids, P)
            online = pol[0] in ("policy=adaptive", "policy=refresh")
            assert g.backend_used == "cudagraph_fused" + (" (online)" if online else ""), (pol, g.backend_used)
            assert r.events == ref.events and (r.visible_kv == ref.visible_kv).all(), pol
            err = np.abs(r.nll - ref.nll).max()
            assert err < 2e-5, (layout, pol, err)
        print("ok")
    """)


# ---------------------------------------------------------------- the benchmark's GPT-NeoX case (not timed)


def test_bench_neox_case_builds_and_runs_on_cpu(tmp_path):
    """`python -m streamkv.bench --models pythia-2.8b` on the GPU; here its construction at the tiny shape
    (head dim 80, 20 rotary dims, biases, parallel residual) and its CPU-runnable rows."""
    import json

    import torch

    from streamkv import bench
    from streamkv.bench import NEOX_SHAPES, bench_dtype

    model, tok, info = bench.load_bench_model("tiny-neox", torch.device("cpu"), torch.float32)
    att = model.gpt_neox.layers[0].attention
    assert model.config.model_type == "gpt_neox" and tok is None
    assert (att.head_size, att.rotary_ndims, model.config.use_parallel_residual) == (80, 20, True)
    total, read = bench.weight_bytes(model)
    assert total - read == model.gpt_neox.embed_in.weight.numel() * 4  # embed_in is not read per token
    p = NEOX_SHAPES["pythia-2.8b"]
    assert p["hidden_size"] // p["num_attention_heads"] == 80 and p["hidden_size"] * p["rotary_pct"] / 32 == 20
    labels = {(c.label, c.R) for c in bench.default_cases("pythia-2.8b", False, set())}
    assert {("seed-style (HF eager + DynamicCache)", 32), ("HF StaticCache + torch.compile (dense)", 32),
            ("ring x cudagraph", 32), ("ring x cudagraph_fused", 32)} <= labels
    assert str(bench_dtype("pythia-2.8b", torch.device("cuda"), torch.bfloat16)) == "torch.float16"
    assert bench_dtype("pythia-2.8b", torch.device("cpu"), torch.float32) == torch.float32
    assert bench.main(["--smoke", "--models", "tiny-neox", "--only", "seed-style", "concat", "--decode-slow", "8",
                       "--profile-steps", "0", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "bench.json").read_text())
    rows = out["rows"]
    assert [(r["label"], r["status"]) for r in rows] == [("seed-style (HF eager + DynamicCache)", "ok"),
                                                          ("concat x eager", "ok")], rows
    assert out["meta"]["model_dtypes"] == {"tiny-neox": "float32"}
    for r in rows:
        assert r["model"] == "tiny-neox" and r["tpot_ms"] > 0 and 0 < r["roofline_ms"] and r["ppl"] > 1
    assert "### tiny-neox" in (tmp_path / "bench.md").read_text()


@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not check what the GPU compiler does (tl.dot's minimum shapes, types): compile
    every kernel ahead of time for sm_90 (H100 / H200) with Triton's own ptxas, at pythia-2.8b's shape
    (head dim 80, 20 rotary dims, per-head qkv, float16) and at Llama's; the GPT-NeoX GEMVs at Pythia's."""
    _interpret("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from streamkv.backends import triton_kernels as tk

        def build(kernel, types, const, num_warps):
            const = {**{q.name: q.default for q in kernel.params if q.is_constexpr and q.has_default}, **const}
            sig = {n: ("constexpr" if n in const else types[n]) for n in kernel.arg_names}
            src = ASTSource(fn=kernel, signature=sig,
                            constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
            pdl = const.get("PDL", False)  # launched with programmatic dependent launch (streamkv/backends/pdl.py)
            return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                                 "launch_pdl": pdl})

        ty = {n: "*fp16" for n in ("qkv_ptr", "bias_ptr", "q_out_ptr", "k_ptr", "v_ptr", "side_ptr", "q_ptr", "o_ptr",
                                   "x_ptr", "r1_ptr", "c1_ptr", "r2_ptr", "c2_ptr", "xo_ptr", "wa_ptr", "ba_ptr",
                                   "ha_ptr", "wb_ptr", "bb_ptr", "hb_ptr", "u_ptr", "b_ptr")}
        ty.update({n: "*fp32" for n in ("cos_ptr", "sin_ptr", "m_ptr", "l_ptr", "acc_ptr")})
        ty.update({n: "*i64" for n in ("step_ptr", "qpos_ptr", "ws_ptr", "sw_ptr", "fslot_ptr", "fsrc_ptr", "fpos_ptr")})
        ty.update({"valid_ptr": "*i1", "stride_kh": "i32", "stride_sh": "i32", "scale": "fp32", "N": "i32", "eps": "fp32"})
        for H, Hkv, D, R, layout, rotate_k, side, bias in [(32, 32, 80, 20, "per_head", True, True, True),
                                                           (32, 32, 80, 20, "per_head", False, False, True),
                                                           (32, 8, 128, 128, "grouped", True, True, False)]:
            build(tk._kv_update_kernel, ty, dict(
                HQ=H, HKV=Hkv, HQP=32, HKVP=triton.next_power_of_2(Hkv), D=D, DP=triton.next_power_of_2(D), ROT=R,
                RHP=triton.next_power_of_2(R // 2), **tk.qkv_offsets(layout, H, Hkv, D), F=4, ROTATE_K=rotate_k,
                HAS_SIDE=side, HAS_BIAS=bias), 2)
        for G, D, R, rotate_k in [(1, 80, 20, False), (1, 80, 20, True), (4, 80, 80, True), (3, 64, 64, False)]:
            build(tk._attn_split_kernel, ty, dict(C=2084, SPLIT_LEN=256, G=G, GP=16, D=D, ROT=R, RHP=tk._dot_width(R // 2),
                                                  PP=tk._dot_width(D - R), BLOCK_N=32, NS=9, ROTATE_K=rotate_k), 8)
        for rotate_k in (False, True):  # the rows kernel at its default launch (one warp)
            build(tk._attn_rows_kernel, ty, dict(C=2084, SPLIT_LEN=64, G=1, D=80, DP=128, ROT=20, BLOCK_N=64, NS=33,
                                                 ROTATE_K=rotate_k), 1)
        build(tk._attn_reduce_kernel, ty, dict(NS=9, NSP=16, D=80, DP=128), 1)
        for n_add, two in [(0, True), (2, True), (1, False)]:
            ln = build(tk._add_layer_norm_kernel, ty, dict(BLOCK=4096, N_ADD=n_add, HAS_C1=True, HAS_C2=n_add > 1,
                                                           TWO=two, WRITE_X=n_add > 0), 8)
            ptx = ln.asm["ptx"]  # every load (inputs and the norm's weights) before the first store: one round trip
            assert ptx.rindex("ld.global") < ptx.index("st.global"), (n_add, two)
        ptx = build(tk._add_layer_norm_kernel, ty, dict(BLOCK=4096, N_ADD=2, HAS_C1=True, HAS_C2=True, TWO=True,
                                                        WRITE_X=True), 16).asm["ptx"]  # as launched for width 2560
        assert ptx.rindex("ld.global") < ptx.index("st.global")
        build(tk._bias_gelu_kernel, ty, dict(BLOCK=1024, HAS_BIAS=True), 4)
        # cudagraph_fused_gemv's GPT-NeoX GEMVs at their measured launch configs: dense_4h_to_h with the bias and
        # two residual rows in the epilogue, dense with the bias, the final LayerNorm + embed_out
        from streamkv.backends import gemv_kernels as gk
        ty.update({n: "*fp16" for n in ("r_ptr", "gamma_ptr", "beta_ptr", "w_ptr", "e1_ptr", "e2_ptr", "y_ptr", "s_ptr")})
        ty["stride_wn"] = "i32"
        for (N, K), pro, n_add, k_pow2 in [((2560, 10240), 0, 2, 1), ((2560, 2560), 0, 0, 1), ((50304, 2560), 3, 0, 4096)]:
            bn, bk, warps = gk.gemv_config(N, K)
            build(gk._gemv_kernel, ty, dict(K=K, PROLOGUE=pro, HAS_R=False, WRITE_S=False, EXACT=True, HAS_BIAS=True,
                                            N_ADD=n_add, BLOCK_N=bn, BLOCK_K=bk, UNROLL=gk.gemv_unroll(K, bn, bk, warps),
                                            K_POW2=k_pow2), warps)
        # the paired query_key_value + dense_h_to_4h (+ bias + GELU) at its measured launch configs
        ty.update({n: "*fp16" for n in ("x1_ptr", "w1_ptr", "y1_ptr", "x2_ptr", "w2_ptr", "b2_ptr", "y2_ptr")})
        ty.update({n: "i32" for n in ("N1", "N2", "stride1", "stride2")})
        (bn1, bk1, w1), (bn2, bk2, w2) = gk.MEASURED_PAIRS[(7680, 10240, 2560)]
        bk, warps = min(bk1, bk2), max(w1, w2)
        build(gk._gemv_pair_kernel, ty, dict(K=2560, HAS_BIAS2=True, GELU2=True, BLOCK_N1=bn1, BLOCK_N2=bn2, BLOCK_K=bk,
                                             UNROLL1=gk.gemv_unroll(2560, bn1, bk, warps),
                                             UNROLL2=gk.gemv_unroll(2560, bn2, bk, warps)), warps)
        # the GPT-NeoX GEMV step's kernels with PDL: each lets the next one launch, then waits for the previous
        pdl = [build(tk._kv_update_kernel, ty, dict(
                   HQ=32, HKV=32, HQP=32, HKVP=32, D=80, DP=128, ROT=20, RHP=16, **tk.qkv_offsets("per_head", 32, 32, 80),
                   F=4, ROTATE_K=True, HAS_SIDE=True, HAS_BIAS=True, PDL=True), 2),
               build(tk._kv_update_kernel, ty, dict(  # one program per KV head, as the GEMV step launches it
                   HQ=32, HKV=32, HQP=1, HKVP=1, D=80, DP=128, ROT=20, RHP=16, **tk.qkv_offsets("per_head", 32, 32, 80),
                   F=4, ROTATE_K=True, HAS_SIDE=True, HAS_BIAS=True, NB=32, PDL=True), 2),
               build(tk._attn_rows_kernel, ty, dict(C=2084, SPLIT_LEN=64, G=1, D=80, DP=128, ROT=20, BLOCK_N=64, NS=33,
                                                    ROTATE_K=False, PDL=True), 1),
               build(tk._attn_rows_kernel, ty, dict(C=2084, SPLIT_LEN=64, G=1, D=80, DP=64, DB=16, ROT=20, BLOCK_N=64,
                                                    NS=33, ROTATE_K=False, PDL=True), 1),  # two tiles, as launched
               build(tk._attn_split_kernel, ty, dict(C=2084, SPLIT_LEN=256, G=1, GP=16, D=80, ROT=20, RHP=16, PP=64,
                                                     BLOCK_N=32, NS=9, ROTATE_K=True, PDL=True), 8),
               build(tk._attn_reduce_kernel, ty, dict(NS=33, NSP=64, D=80, DP=128, PDL=True), 1),
               build(tk._add_layer_norm_kernel, ty, dict(BLOCK=4096, N_ADD=2, HAS_C1=True, HAS_C2=True, TWO=True,
                                                         WRITE_X=True, PDL=True), 8),
               build(gk._gemv_kernel, ty, dict(K=10240, PROLOGUE=0, HAS_R=False, WRITE_S=False, EXACT=True,
                                               HAS_BIAS=False, N_ADD=0, BLOCK_N=4, BLOCK_K=256,
                                               UNROLL=gk.gemv_unroll(10240, 4, 256, 8), K_POW2=1, PDL=True), 8),
               build(gk._gemv_pair_kernel, ty, dict(K=2560, HAS_BIAS2=True, GELU2=True, BLOCK_N1=bn1, BLOCK_N2=bn2,
                                                    BLOCK_K=bk, UNROLL1=gk.gemv_unroll(2560, bn1, bk, warps),
                                                    UNROLL2=gk.gemv_unroll(2560, bn2, bk, warps), PDL=True), warps)]
        for k in pdl:
            ptx = k.asm["ptx"]
            assert k.metadata.launch_pdl and ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait")
            assert ptx.index("griddepcontrol.wait") < min(ptx.index(op) for op in ("ld.global", "st.global") if op in ptx)
        print("ok")
    """, interpret=False)


@needs_triton
def test_fused_step_stages_the_query_ring_in_interpreter():
    """The fused step writes each layer's rotated query into the query ring's stage, and a step without
    scoring moves all layers' rows into the ring at once (ScoredEviction.commit_queries): the attention
    refresh (keep score) and SnapKV on the fused path equal concat x eager (events, NLL to 2e-5), and the
    ring after the run equals the torch graph step's, which copies layer by layer."""
    _interpret(TINY_NEOX_SCORED.format(n=64) + """
        def ev(*ov):
            c = compose("model=tiny_neox", "progress=false", f"prefill_tokens={P}", "n_sink=4", "window=12",
                        "compress_every=8", *ov)
            return make_evaluator(c, model, len(ids), torch.device("cpu"))
        attention = ("policy=refresh", "policy.refresh_budget=4", "policy.refresh_select=attention",
                     "policy.refresh_keep=score", "policy.obs_window=4")
        cases = [("ring", attention), ("static", attention), ("ring", ("policy=snapkv", "policy.obs_window=4"))]
        for layout, pol in cases:
            ref = ev(*pol).run(ids, P)
            assert len(ref.events) > 3, pol
            fused = GraphEvaluator(ev(*pol), layout, fused=True, capture=False)
            r = fused.run(ids, P)
            assert fused.scored.staged and r.events == ref.events, (layout, pol)
            assert np.abs(r.nll - ref.nll).max() < 2e-5, (layout, pol, np.abs(r.nll - ref.nll).max())
            plain = GraphEvaluator(ev(*pol), layout, capture=False)
            plain.run(ids, P)
            assert not plain.scored.staged
            assert torch.allclose(fused.scored.qring, plain.scored.qring, atol=1e-5), (layout, pol)
            assert fused.scored.qring.abs().sum() > 0
        print("ok")
    """)


@needs_triton
def test_attn_bench_smoke_and_tune_in_interpreter(tmp_path):
    """scripts/attn_bench.py (timed on the GPU) in Triton's interpreter: both kernels at the tiny shape agree
    with the float64 reference in both layouts, and --tune runs every launch shape of its grid."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_INTERPRET": "1"}
    for extra, name in (([], "bench.json"), (["--tune"], "tune.json")):
        cmd = [sys.executable, "scripts/attn_bench.py", "--smoke", *extra, "--out", str(tmp_path / name)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    kinds = {(a, b) for a in ("ring", "stat") for b in ("rows", "parts")}
    assert {(r["layout"][:4], r["kernel"]) for r in rows} == kinds
    tune = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert [(r["kernel"], r["block_n"], r["waves"], r["num_warps"]) for r in tune] == [
        ("rows", 16, 2, 1), ("rows", 32, 4, 2), ("parts", 16, 2, 4)]
    assert all(r["rel_err"] < 1e-5 and r["us_per_layer"] > 0 for r in rows + tune)
