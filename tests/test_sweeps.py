"""Every named sweep (conf/sweep/*.yaml) composes and validates, job by job (no model loads), and
includes what the analysis needs: the strict-streaming baseline and at least two repeats."""

from __future__ import annotations

import pytest

from conftest import ROOT

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml"))


def jobs_of(preset: str, *extra: str) -> list:
    from omegaconf import OmegaConf

    from streamkv.cli import compose_jobs
    from streamkv.record import canonical_config, run_identity
    from streamkv.validate import validate

    cfgs = compose_jobs(["-m", f"+sweep={preset}", *extra])
    for c in cfgs:
        validate(c)
    identities = [run_identity(OmegaConf.to_container(c, resolve=True)) for c in cfgs]
    assert len(identities) == len(set(identities))  # distinct runs, no duplicates
    # as the run records hold them: every policy knob (neutral where the policy takes none)
    return [OmegaConf.create(canonical_config(OmegaConf.to_container(c, resolve=True))) for c in cfgs]


def test_presets_exist():
    assert {"phase_a", "phase_b_core8", "b2_overlap", "b3_refresh_sinks", "b4_adaptive", "phase_c_managers",
            "phase_d_fused", "phase_e_baselines"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_baseline_and_repeats(preset):
    dataset = "book" if len(preset) % 2 else "wiki"  # both protocols, without composing everything twice
    cfgs = jobs_of(preset, f"dataset={dataset}")
    assert all(c.dataset.name == dataset for c in cfgs)
    baseline = [c for c in cfgs if c.policy.name == "streaming" and c.compress_every == 1]
    assert baseline, "the strict-streaming baseline (R=1) must be part of every sweep"
    import json
    from collections import Counter

    from omegaconf import OmegaConf

    # the config without its repeat, as one hashable key (linear time). A preset that sweeps `seed` (the
    # pass-key texts: each seed is another key) repeats every config over its seeds instead of `repeat`.
    over_seeds = len({c.seed for c in cfgs}) > 1
    keys = [json.dumps({**OmegaConf.to_container(c, resolve=True), "repeat": 0, **({"seed": 0} if over_seeds else {})},
                       sort_keys=True) for c in cfgs]
    count = Counter(keys)
    for key in keys:  # every config is repeated at least twice (timing medians)
        same = count[key]
        assert same >= 2


def test_phase_b_core8_matrix():
    cfgs = jobs_of("phase_b_core8")
    core = {(c.compress_every, c.policy.max_drop, c.policy.refresh_budget) for c in cfgs if c.compress_every > 1}
    assert core == {(r, d, b) for r in (32, 64) for d in (None, 256) for b in (0, 16)}


def test_command_line_wins_over_the_preset():
    cfgs = jobs_of("phase_a", "window=64", "repeat=0", "model=tiny_llama")
    assert {c.window for c in cfgs} == {64} and {c.repeat for c in cfgs} == {0}
    assert sorted(c.compress_every for c in cfgs) == [1, 16, 32, 64, 128]


def test_phase_c_on_cpu_keeps_every_manager_once():
    cfgs = jobs_of("phase_c_managers", "device=cpu", "backend=eager")
    assert {c.backend.name for c in cfgs} == {"eager"}
    assert {c.cache.name for c in cfgs if c.policy.name == "refresh"} == {"concat", "soft_ring", "ring", "static"}
    assert len(cfgs) == 12  # the fast-path block collapses into the eager one: 2 baselines + 4 managers, x 2


def _job_overrides(preset: str, *extra: str) -> set:
    """The jobs of a preset as override sets, without composing them (cheap)."""
    from hydra import initialize_config_dir

    from streamkv.cli import CONF_DIR, expand_overrides, preset_blocks
    from streamkv.policies import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        blocks = preset_blocks([f"+sweep={preset}", *extra])
    return {tuple(sorted(j)) for b in blocks for j in expand_overrides(b, True)}


def test_passkey_preset():
    assert len(_job_overrides("passkey")) == 3 * 3 * 3 * 11  # length x depth x seed (the key) x policies; no repeats
    cfgs = jobs_of("passkey", "dataset.length=2048", "dataset.depth=0.5", "seed=0")
    assert len(cfgs) == 11
    assert {(c.model.name, c.dataset.name, c.n_sink, c.window, c.device) for c in cfgs} == {
        ("smollm2_135m", "passkey", 4, 1020, "cuda")}
    runs = {(c.policy.name, c.policy.refresh_select if c.policy.name == "refresh" else None, c.compress_every,
             c.cache.name, c.backend.name) for c in cfgs}
    assert runs == {("full", None, 1, "ring", "cudagraph_fused"), ("streaming", None, 1, "ring", "cudagraph_fused"),
                    ("streaming", None, 32, "ring", "cudagraph_fused"),
                    ("refresh", "uniform", 32, "ring", "cudagraph_fused"),
                    ("refresh", "structural", 32, "ring", "cudagraph_fused"),
                    ("refresh", "entropy", 32, "static", "cudagraph_fused"),  # online on the graph path
                    ("refresh", "attention", 32, "ring", "cudagraph_fused"),  # refresh_keep fifo and score
                    ("snapkv", None, 32, "ring", "cudagraph_fused"), ("h2o", None, 32, "ring", "cudagraph_fused"),
                    ("tova", None, 32, "ring", "cudagraph_fused")}
    assert {c.policy.refresh_budget for c in cfgs if c.policy.name == "refresh"} == {16}
    assert {c.policy.refresh_keep for c in cfgs if c.policy.refresh_select == "attention"} == {"fifo", "score"}
    cpu = jobs_of("passkey", "dataset.length=2048", "dataset.depth=0.5", "seed=0", "device=cpu",
                  "cache=concat", "backend=eager")
    assert len(cpu) == 11 and {(c.cache.name, c.backend.name) for c in cpu} == {("concat", "eager")}


def test_regime_preset_prechecks_and_skips_invalid_combinations():
    from streamkv.cli import compose_jobs, precheck

    assert len(precheck(["-m", "+sweep=regime"])) == 112
    cfgs = compose_jobs(["-m", "+sweep=regime"])
    grid = [c for c in cfgs if c.policy.name != "full"]
    for c in grid:
        W, R = c.window, c.compress_every
        assert R in (1, W // 16, W // 4, W) and c.n_sink == 4
        assert c.repeat in ((0, 1) if c.dataset.name == "wiki" else (0,))
        if c.policy.name == "overlap":
            assert c.policy.overlap == W // 8 < R
        if c.policy.name == "max_drop":
            assert c.policy.max_drop == W // 16 < R  # binds: a prune would drop R > max_drop
        if c.policy.name == "refresh":
            assert c.policy.refresh_budget == 16
    for ds in ("wiki", "book"):
        for W in (256, 1024, 2048):
            streaming = {c.compress_every for c in grid if (c.dataset.name, c.window, c.policy.name) ==
                         (ds, W, "streaming")}
            assert streaming == {1, W // 16, W // 4, W}
    full = {(c.dataset.name, c.dataset.max_tokens, c.repeat) for c in cfgs if c.policy.name == "full"}
    assert full == {("wiki", 4096, 0), ("wiki", 4096, 1), ("book", 8000, 0), ("book", 8000, 1)}


def test_passkey_refresh_region_preset_keeps_the_passkey_budget():
    assert len(_job_overrides("passkey_refresh_region")) == 3 * 3 * 3 * 3
    jobs = jobs_of("passkey_refresh_region", "dataset.length=2048", "dataset.depth=0.1", "seed=0")
    assert [(c.window, c.compress_every) for c in jobs if c.policy.name == "streaming"] == [(1020, 1)]
    cfgs = [c for c in jobs if c.policy.name == "refresh"]
    assert sorted((c.policy.refresh_budget, c.window) for c in cfgs) == [(64, 972), (128, 908)]
    ref = jobs_of("passkey", "dataset.length=2048", "dataset.depth=0.1", "seed=0")
    budget = {c.n_sink + c.policy.refresh_budget + c.window for c in ref if c.policy.name == "refresh"}
    assert {c.n_sink + c.policy.refresh_budget + c.window for c in cfgs} == budget == {1040}
    assert {(c.policy.refresh_select, c.policy.refresh_keep, c.compress_every, c.cache.name, c.backend.name,
             c.dataset.name, c.device) for c in cfgs} == {("attention", "score", 32, "ring", "cudagraph_fused",
                                                          "passkey", "cuda")}


def test_refresh_region_ppl_preset_matches_the_passkey_budget():
    jobs = jobs_of("refresh_region_ppl", "dataset=book", "repeat=0")
    got = sorted((c.policy.name, c.compress_every, c.n_sink + (c.policy.refresh_budget or 0) + c.window,
                  c.cache.name) for c in jobs)
    assert got == [("h2o", 32, 1024, "static")] + [("refresh", 32, 1040, "ring")] * 4 + [
        ("refresh", 32, 1040, "static"), ("snapkv", 32, 1024, "static"), ("streaming", 1, 1024, "ring"),
        ("streaming", 32, 1024, "ring"), ("tova", 32, 1024, "static")]
    assert {c.policy.positions for c in jobs if c.policy.name in ("snapkv", "tova", "h2o")} == {"shift"}
    assert {(c.policy.refresh_budget, c.window, c.policy.refresh_select, c.policy.refresh_keep, c.cache.name)
            for c in jobs if c.policy.name == "refresh"} == {
        (16, 1020, "attention", "score", "ring"), (128, 908, "attention", "score", "ring"),
        (16, 1020, "uniform", "fifo", "ring"), (16, 1020, "structural", "fifo", "ring"),
        (16, 1020, "entropy", "fifo", "static")}
