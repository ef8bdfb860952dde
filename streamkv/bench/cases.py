"""The benchmark's plan: which paths (cache manager x backend x policy x R, and the two HF baselines) are
timed for each model."""

from __future__ import annotations

from dataclasses import dataclass

from streamkv.bench.shapes import is_neox_bench


@dataclass
class Case:
    label: str  # what the table shows in the "path" column
    kind: str  # ours | seed | hf_static
    cache: str = "concat"
    backend: str = "eager"
    policy: tuple = ()  # extra overrides, e.g. ("policy=max_drop", "policy.max_drop=8")
    policy_name: str = "streaming"
    R: int = 32
    decode: int = 0  # decode steps (0: the model's default for the kind)
    profile: bool = False


# the controlled policies timed next to streaming on the graph paths: (overrides, table name)
SCHEDULED_POLICIES = ((("policy=max_drop", "policy.max_drop=8"), "max_drop (8)"),
                      (("policy=refresh", "policy.refresh_budget=64"), "refresh (uniform, 64)"))

REFRESH_ATTENTION = ("policy=refresh", "policy.refresh_select=attention", "policy.refresh_budget=128",
                     "policy.refresh_keep=score")


def default_cases(model: str, smoke: bool, managers: set) -> list[Case]:
    if is_neox_bench(model):
        return neox_cases(smoke)
    if smoke:
        cases = [Case("seed-style (HF eager + DynamicCache)", "seed", profile=True),
                 Case("HF StaticCache + torch.compile (dense)", "hf_static"),
                 Case("concat x eager", "ours", profile=True),
                 Case("ring x cudagraph (uncaptured on CPU)", "ours", "ring", "cudagraph", R=1),
                 Case("ring x cudagraph (uncaptured on CPU)", "ours", "ring", "cudagraph"),
                 Case("static x cudagraph (uncaptured on CPU)", "ours", "static", "cudagraph")]
        return cases
    big = not model.startswith("smollm2")
    cases = [Case("seed-style (HF eager + DynamicCache)", "seed", profile=True),
             Case("HF StaticCache + torch.compile (dense)", "hf_static", profile=not big),
             Case("concat x eager", "ours", profile=not big)]
    if not big:
        cases += [Case("concat x compile", "ours", backend="compile"),
                  Case("concat x fused", "ours", backend="fused")]
    for R in (1, 32, 64):
        cases.append(Case("ring x cudagraph_fused", "ours", "ring", "cudagraph_fused", R=R, profile=R == 32))
    # the same with the fused-prologue GEMVs (streamkv/backends/gemv_kernels.py)
    cases.append(Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=32, profile=True))
    cases.append(Case("ring x cudagraph", "ours", "ring", "cudagraph", R=32, profile=not big))
    if not big:
        for R in (1, 64):
            cases.append(Case("ring x cudagraph", "ours", "ring", "cudagraph", R=R))
        for backend in ("cudagraph_fused", "cudagraph"):
            cases += [Case(f"ring x {backend}", "ours", "ring", backend, R=32, policy=p, policy_name=name)
                      for p, name in SCHEDULED_POLICIES]
        # the GEMVs with the other scheduled policies and R (the same weights per step: expected no change)
        for R in (1, 64):
            cases.append(Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=R))
        cases += [Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=32, policy=p,
                       policy_name=name) for p, name in SCHEDULED_POLICIES]
        # the score baselines scored inside the graph (ring: original positions; static: positions=shift);
        # TOVA and SnapKV score only on prune steps, H2O every step
        for backend in ("cudagraph_fused", "cudagraph_fused_gemv"):
            for pol in ("tova", "h2o", "snapkv"):
                cases.append(Case(f"ring x {backend}", "ours", "ring", backend, R=32, policy=(f"policy={pol}",),
                                  policy_name=pol))
        # the attention refresh (SnapKV's scoring of the segment about to go, a region kept by score)
        cases.append(Case("ring x cudagraph_fused", "ours", "ring", "cudagraph_fused", R=32,
                          policy=REFRESH_ATTENTION, policy_name="refresh (attention, 128, keep score)"))
        for pol in ("tova", "h2o", "snapkv"):
            cases.append(Case("static x cudagraph_fused", "ours", "static", "cudagraph_fused", R=32,
                              policy=(f"policy={pol}", "policy.positions=shift"), policy_name=f"{pol} (shift)"))
        # entropy-driven: online in the static layout (one host sync per step), vs its slack-mode control
        for backend in ("cudagraph_fused", "cudagraph_fused_gemv"):
            for mode in ("entropy", "slack"):
                cases.append(Case(f"static x {backend}", "ours", "static", backend, R=1,
                                  policy=("policy=adaptive", f"policy.mode={mode}", "policy.extra_slack=64"),
                                  policy_name=f"adaptive {mode} 64"))
    for R in ((1, 32, 64) if not big else (1, 32)):
        cases.append(Case("static x cudagraph_fused", "ours", "static", "cudagraph_fused", R=R))
    cases.append(Case("static x cudagraph_fused_gemv", "ours", "static", "cudagraph_fused_gemv", R=32))
    if not big:
        cases.append(Case("static x cudagraph", "ours", "static", "cudagraph", R=32))
    # host-driven preallocated managers, where this checkout has them (streamkv/cache)
    for m in ("ring", "static", "soft_ring"):
        if m in managers:
            cases.append(Case(f"{m} x eager", "ours", m, "eager", R=32))
    return cases


def neox_cases(smoke: bool) -> list[Case]:
    """The GPT-NeoX (Pythia) models: the seed-style baseline (HF eager + DynamicCache + lazy prune by slicing,
    exactly as for the Llama shapes: HF's own positions, no re-rotation), HF StaticCache + torch.compile dense,
    and our graph step at streaming R=32 (ring x cudagraph; ring and static x cudagraph_fused and
    cudagraph_fused_gemv, both streamkv/backends/fused_neox.py)."""
    cases = [Case("seed-style (HF eager + DynamicCache)", "seed", profile=True),
             Case("HF StaticCache + torch.compile (dense)", "hf_static", profile=not smoke),
             Case("concat x eager", "ours", profile=False)]
    if smoke:  # un-captured graph step; the Triton kernels need TRITON_INTERPRET=1 on the CPU
        return cases + [Case("ring x cudagraph_fused (uncaptured on CPU)", "ours", "ring", "cudagraph_fused")]
    return cases + [Case("ring x cudagraph_fused", "ours", "ring", "cudagraph_fused", R=32, profile=True),
                    Case("ring x cudagraph_fused_gemv", "ours", "ring", "cudagraph_fused_gemv", R=32, profile=True),
                    Case("ring x cudagraph", "ours", "ring", "cudagraph", R=32, profile=True),
                    Case("static x cudagraph_fused", "ours", "static", "cudagraph_fused", R=32),
                    Case("static x cudagraph_fused_gemv", "ours", "static", "cudagraph_fused_gemv", R=32)]
