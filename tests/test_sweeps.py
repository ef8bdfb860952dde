"""Every named sweep (conf/sweep/*.yaml) composes and validates, job by job (no model loads), and
includes what the analysis needs: the strict-streaming baseline and at least two repeats."""

from __future__ import annotations

import pytest

from conftest import ROOT

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml"))


def jobs_of(preset: str, *extra: str) -> list:
    from omegaconf import OmegaConf

    from streamkv.cli import compose_jobs
    from streamkv.config import validate
    from streamkv.record import run_identity

    cfgs = compose_jobs(["-m", f"+sweep={preset}", *extra])
    for c in cfgs:
        validate(c)
    identities = [run_identity(OmegaConf.to_container(c, resolve=True)) for c in cfgs]
    assert len(identities) == len(set(identities))  # distinct runs, no duplicates
    return cfgs


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
    for c in cfgs:  # every config is repeated at least twice (timing medians)
        same = [d for d in cfgs if {**d, "repeat": 0} == {**c, "repeat": 0}]
        assert len(same) >= 2


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
