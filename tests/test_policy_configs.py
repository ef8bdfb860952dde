"""One config dataclass per policy: the knobs each policy takes, their defaults (once, in the dataclass; the
YAML preset only names it), the neutral values other policies run with, and the run identity over them."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import compose

LAZY = {"max_drop", "overlap", "refresh_budget", "refresh_per_prune", "refresh_select", "refresh_keep", "obs_window",
        "kernel_size", "pooling", "mode", "extra_slack", "entropy_window", "entropy_low", "entropy_high"}
# the knobs each policy takes (as the per-policy `knobs` tuples had them)
TAKES = {"full": set(), "streaming": set(), "max_drop": LAZY, "overlap": LAZY, "refresh": LAZY, "adaptive": LAZY,
         "snapkv": {"obs_window", "kernel_size", "pooling", "positions"}, "h2o": {"recent_frac", "positions"},
         "tova": {"positions"}}


def test_each_policy_takes_exactly_its_knobs():
    from streamkv.config import PolicyConfig
    from streamkv.policies import POLICIES

    assert set(POLICIES) == set(TAKES)
    for name, cls in POLICIES.items():
        assert issubclass(cls.config, PolicyConfig) and cls.config().name == name
        assert set(cls.knobs()) == TAKES[name], name


def test_neutral_values_are_the_identity_format():
    """The neutral value of a knob (its default where it is introduced) is the value every earlier run of a
    policy without the knob recorded: record.POLICY_KNOBS."""
    from streamkv.policies.base import knob_defaults
    from streamkv.record import POLICY_KNOBS

    assert knob_defaults() == POLICY_KNOBS


@pytest.mark.parametrize("name", sorted(TAKES))
def test_preset_composes_to_its_dataclass_defaults(name):
    from omegaconf import OmegaConf

    from streamkv.policies import POLICIES

    cfg = compose("model=tiny_llama", f"policy={name}", *(["compress_every=16"] if name == "overlap" else []))
    assert OmegaConf.get_type(cfg.policy) is POLICIES[name].config
    assert OmegaConf.to_container(cfg.policy) == dataclasses.asdict(POLICIES[name].config())


def test_preset_defaults_differ_from_neutral_only_in_their_piece():
    from streamkv.policies import POLICIES
    from streamkv.policies.base import knob_defaults

    neutral = knob_defaults()
    away = {name: {k for k in cls.knobs() if getattr(cls.config(), k) != neutral[k]} for name, cls in POLICIES.items()}
    assert away == {"full": set(), "streaming": set(), "max_drop": {"max_drop"}, "overlap": {"overlap"},
                    "refresh": {"refresh_budget"}, "adaptive": {"mode", "extra_slack"}, "snapkv": set(), "h2o": set(),
                    "tova": set()}


@pytest.mark.parametrize("overrides,message", [
    (["policy.obs_window=3", "policy=streaming"], "policy.obs_window: not a knob of policy=streaming (it takes none"),
    (["policy=h2o", "policy.obs_window=3"], "policy.obs_window: not a knob of policy=h2o (its knobs: positions, "
                                            "recent_frac; got 3)"),
    (["policy=refresh", "+policy.refresh_bugdet=3"], "policy.refresh_bugdet: unknown key (did you mean "
                                                     "policy.refresh_budget?)"),
    (["policy=refresh", "policy.name=h2o"], "policy.refresh_budget: not a knob of policy=h2o"),
    (["policy.name=snapkv", "policy.obs_window=abc"], "policy.obs_window: Value 'abc' of type 'str' could not be"),
])
def test_a_stray_knob_fails_in_one_line(overrides, message):
    from streamkv.cli import precheck
    from streamkv.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        precheck(["model=tiny_llama", *overrides])
    assert "\n" not in str(exc.value) and message in str(exc.value), str(exc.value)


def test_another_policys_knob_at_its_neutral_value_passes_and_changes_nothing():
    from omegaconf import OmegaConf

    from streamkv.cli import precheck
    from streamkv.record import run_identity

    assert precheck(["model=tiny_llama", "policy.overlap=0"]) == precheck(["model=tiny_llama"])
    cfg = OmegaConf.to_container(compose("model=tiny_llama", "policy=tova", "policy.recent_frac=0.5"))
    assert run_identity(cfg) == run_identity(OmegaConf.to_container(compose("model=tiny_llama", "policy=tova")))


def test_identity_fills_the_knobs_a_policy_lacks():
    """A streaming run hashes as the shared-config record of before did (every knob at its neutral value), and a
    preset's own value counts."""
    from omegaconf import OmegaConf

    from streamkv.record import POLICY_KNOBS, canonical_config, run_identity

    cfg = OmegaConf.to_container(compose("model=tiny_llama"))
    assert set(cfg["policy"]) == {"name"}
    old = {**cfg, "policy": {"name": "streaming", **POLICY_KNOBS}}
    assert canonical_config(cfg) == old and run_identity(cfg) == run_identity(old)
    md = OmegaConf.to_container(compose("model=tiny_llama", "policy=max_drop"))
    assert canonical_config(md)["policy"]["max_drop"] == 8
    assert run_identity(md) != run_identity({**md, "policy": {**md["policy"], "max_drop": 9}})


def test_settings_fill_the_lazy_knobs_of_streaming():
    from streamkv.policies import build_policy
    from streamkv.policies.lazy import LazyConfig

    pol = build_policy(compose("model=tiny_llama"))
    assert isinstance(pol.pcfg, LazyConfig)
    assert (pol.max_drop, pol.overlap, pol.refresh_budget, pol.mode) == (None, 0, 0, None)
