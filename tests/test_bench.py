"""The benchmark's wiring (not its timings): our paths are built as a run builds them, and one call of
main() keeps nothing for the next."""

from __future__ import annotations

import json

import torch


def test_bench_builds_our_evaluators_as_a_run_does():
    """The host side comes from the runner (the case's cache manager, not a stand-in), the backend from
    attach_backend with the benchmark's GemvOptions; graph steps capture on CUDA only."""
    from streamkv import bench
    from streamkv.backends.graph import GemvOptions, GraphEvaluator

    dev = torch.device("cpu")
    model, _, _ = bench.load_bench_model("tiny", dev, torch.float32)
    gemv = GemvOptions(max_bytes=1 << 20)
    case = bench.Case("static x cudagraph", "ours", "static", "cudagraph", R=8)
    ev = bench.our_evaluator(case, model, None, 80, dev, torch.float32, 4, 32, gemv=gemv)
    assert isinstance(ev, GraphEvaluator) and not ev.capture and ev.layout == "static"
    assert ev.gemv is gemv and ev.eager.cache.name == "static" and ev.backend_used == "cudagraph"
    default = bench.our_evaluator(case, model, None, 80, dev, torch.float32, 4, 32)
    assert default.gemv == GemvOptions()
    eager = bench.our_evaluator(bench.Case("soft_ring x eager", "ours", "soft_ring", "eager", R=4,
                                           policy=("policy=max_drop", "policy.max_drop=8")),
                                model, None, 80, dev, torch.float32, 4, 32)
    assert not isinstance(eager, GraphEvaluator) and eager.cache.name == "soft_ring"
    assert eager.policy.name == "max_drop" and eager.backend_used == "eager"


def test_bench_main_keeps_no_rows_between_calls(tmp_path):
    from streamkv import bench

    args = ["--smoke", "--only", "seed-style", "--decode-slow", "4", "--profile-steps", "0"]
    for out in (tmp_path / "a", tmp_path / "b"):
        assert bench.main([*args, "--out", str(out)]) == 0
        rows = json.loads((out / "bench.json").read_text())["rows"]
        assert [(r["label"], r["status"]) for r in rows] == [("seed-style (HF eager + DynamicCache)", "ok")]
        assert (out / "bench.md").read_text().count("| seed-style") == 1
