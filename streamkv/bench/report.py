"""The benchmark's results: one Row per timed path, written as JSON (every field) and as the Markdown
tables of docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    model: str
    label: str
    cache: str
    backend: str
    policy: str
    R: int
    status: str = "ok"
    error: str = ""
    prefill_tokens: int = 0
    decode_tokens: int = 0
    tpot_ms: float = float("nan")
    ttft_ms: float = float("nan")
    prefill_ms: float = float("nan")
    peak_mem_mb: float = float("nan")  # decode phase (prefill logits excluded)
    peak_mem_all_mb: float = float("nan")  # whole timed run, prefill included
    weights_mb: float = float("nan")
    kv_capacity_mb: float = float("nan")
    kv_capacity_slots: int = 0
    schedule_mb: float = float("nan")  # graph paths: schedule tables, step buffers (not the KV cache)
    resident_before_mb: float = float("nan")  # allocated when the case started (weights + leftovers)
    other_mb: float = float("nan")  # decode peak - resident before - KV capacity - schedule: activations,
    #                                 the graph's pool, workspaces
    visible_kv_mean: float = float("nan")
    n_prunes: int = -1  # prunes during the timed decode (our paths; -1: not counted, the HF baselines)
    roofline_ms: float = float("nan")
    roofline_frac: float = float("nan")
    ppl: float = float("nan")  # over decode steps 4 .. 4 + decode_slow: the same tokens for every path
    ppl_all: float = float("nan")  # over all decoded tokens of the path
    backend_used: str = ""
    profile: dict = field(default_factory=dict)
    left_resident: list = field(default_factory=list)  # --memory-history: what the case left allocated



def _fmt(x, nd=2):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [f"Device: **{meta.get('device', '?')}**; torch {meta.get('torch')}, transformers "
             f"{meta.get('transformers')}; copy bandwidth (read + write) {meta.get('copy_bw_gbs', 0):.0f} GB/s; "
             f"n_sink {meta.get('n_sink')} + window {meta.get('window')}, prefill {meta.get('n_sink', 0) + meta.get('window', 0)} "
             f"tokens then teacher-forced decode; {meta.get('dtype')}.", ""]
    for model in dict.fromkeys(r.model for r in rows):
        mrows = [r for r in rows if r.model == model]
        seed = next((r.tpot_ms for r in mrows if r.label.startswith("seed") and r.status == "ok"), float("nan"))
        hfs = next((r.tpot_ms for r in mrows if r.label.startswith("HF Static") and r.status == "ok"), float("nan"))
        mdt = meta.get("model_dtypes", {}).get(model)
        lines += [f"### {model}" + (f" ({mdt})" if mdt and mdt != meta.get("dtype") else ""), "",
                  "| path (manager x backend) | policy | R | prunes | TPOT ms | x seed | x HF static | TTFT ms "
                  "| peak MB decode (incl. prefill) | weights MB | KV cap MB (slots) | sched MB | other MB† | roofline ms | % roofline "
                  "| PPL |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mrows:
            if r.status != "ok":
                lines.append(f"| {r.label} | {r.policy} | {r.R} | failed: {r.error} |||||||||||||")
                continue
            used = f" ({r.backend_used})" if r.backend_used and r.backend_used != r.backend else ""
            lines.append(
                f"| {r.label}{used} | {r.policy} | {r.R or '–'} | {r.n_prunes if r.n_prunes >= 0 else '–'} "
                f"| {_fmt(r.tpot_ms, 3)} | {_fmt(seed / r.tpot_ms, 1)} "
                f"| {_fmt(hfs / r.tpot_ms, 2)} | {_fmt(r.ttft_ms, 1)} | {_fmt(r.peak_mem_mb, 0)} "
                f"({_fmt(r.peak_mem_all_mb, 0)}) | {_fmt(r.weights_mb, 0)} "
                f"| {_fmt(r.kv_capacity_mb, 1)} ({r.kv_capacity_slots or '–'}) | {_fmt(r.schedule_mb, 1)} "
                f"| {_fmt(r.other_mb, 0)} "
                f"| {_fmt(r.roofline_ms, 3)} | {_fmt(r.roofline_frac * 100, 1)} | {_fmt(r.ppl, 3)} |")
        lines.append("*PPL over the same decoded tokens for every path (steps 4 .. 4 + "
                     f"{meta.get('decode_slow')} after the prefill); the seed-style path keeps HF's positions "
                     "after slicing, so its PPL differs by design. †decode peak - memory resident when the case "
                     "started (weights and leftovers of earlier cases) - KV capacity - schedule.")
        lines.append("")
        prof = [r for r in mrows if r.profile]
        if prof:
            lines += [f"Kernel profile ({model}, torch.profiler, per decoded token):", "",
                      "| path | R | GPU kernels | host launches | graph launches | GPU busy ms | wall ms (profiled) |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in prof:
                p = r.profile
                lines.append(f"| {r.label} | {r.R or '–'} | {p['kernels_per_token']:.0f} | "
                             f"{p['host_launches_per_token']:.0f} | {p['graph_launches_per_token']:.1f} | "
                             f"{p['gpu_busy_ms_per_token']:.3f} | {p['wall_ms_per_token_profiled']:.3f} |")
            lines.append("")
            for r in prof:
                top = r.profile.get("top_kernels") or []
                if top:
                    lines.append(f"Top GPU kernels per token, {r.label} (R={r.R or '–'}): " + "; ".join(
                        f"{t['name'][:60]} x{t['count_per_token']:.0f} {t['ms_per_token'] * 1e3:.0f} us"
                        for t in top[:8]))
                    lines.append("")
    return "\n".join(lines)


def write_results(out_dir: Path, rows_all: list[Row], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows_all]}
    tmp = out_dir / "bench.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, out_dir / "bench.json")
    (out_dir / "bench.md").write_text(markdown(rows_all, meta))

