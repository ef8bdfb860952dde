"""Eviction policies: one small class each; `build_policy(cfg)` picks one by `policy.name`.

streaming / max_drop / overlap / refresh / adaptive are presets of one lazy-streaming core whose
pieces compose (streamkv.policies.lazy); snapkv / h2o / tova are attention-score baselines
(streamkv.policies.scored); full never evicts. See docs/policies.md.

Each policy's knobs are the fields of its config dataclass (`Policy.config`, defined in its module, a
subclass of streamkv.config.PolicyConfig); `register_configs` makes each the structured config
`policy/<name>_schema` that conf/policy/<name>.yaml lists in its defaults.
"""

from streamkv import config
from streamkv.errors import ConfigError
from streamkv.policies.adaptive import AdaptivePolicy
from streamkv.policies.base import Decision, Policy, StepView
from streamkv.policies.full import FullPolicy
from streamkv.policies.h2o import H2OPolicy
from streamkv.policies.max_drop import MaxDropPolicy
from streamkv.policies.overlap import OverlapPolicy
from streamkv.policies.refresh import RefreshPolicy
from streamkv.policies.snapkv import SnapKVPolicy
from streamkv.policies.streaming import StreamingPolicy
from streamkv.policies.tova import TOVAPolicy

POLICIES = {cls.name: cls for cls in (FullPolicy, StreamingPolicy, MaxDropPolicy, OverlapPolicy, RefreshPolicy,
                                      AdaptivePolicy, SnapKVPolicy, H2OPolicy, TOVAPolicy)}


def check_policy(cfg) -> None:
    """Raise ConfigError (one line) for an unknown policy or a bad knob combination."""
    if cfg.policy.name not in POLICIES:
        raise ConfigError(f"policy: '{cfg.policy.name}' is not one of {', '.join(sorted(POLICIES))}")
    POLICIES[cfg.policy.name].check(cfg)


def build_policy(cfg) -> Policy:
    return POLICIES[cfg.policy.name](cfg)


def register_configs() -> None:
    """Register the run schema (streamkv.config.register_configs) and one structured config per policy."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    config.register_configs()
    cs = ConfigStore.instance()
    for name, cls in POLICIES.items():
        node = OmegaConf.structured(cls.config)
        # open to other keys: `policy.<knob>` of another policy composes and check_policy names the
        # policy that takes it (Hydra would only say it cannot override the key)
        OmegaConf.set_struct(node, False)
        cs.store(group="policy", name=f"{name}_schema", node=node)


__all__ = ["Decision", "Policy", "StepView", "POLICIES", "build_policy", "check_policy", "register_configs"]
