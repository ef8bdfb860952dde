"""Finished runs stay findable: a committed record's identity equals the identity today's code gives the
same command line (a knob added later must not change it at its neutral value: record.LEGACY_VALUES)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "results" / "records"
# one run per sweep family: old records (made before most knobs existed) and new ones
SAMPLES = ["phase_a_wiki/0", "b3_wiki/0", "e_wiki/0", "passkey_2048/0", "passkey_2048/30"]


@pytest.mark.parametrize("run", [s for s in SAMPLES if (RECORDS / s / "result.json").exists()])
def test_committed_record_identity_matches_todays_config(run):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from streamkv.config import register_configs
    from streamkv.record import run_identity

    d = RECORDS / run
    stored = json.loads((d / "result.json").read_text())["identity"]
    overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert run_identity(OmegaConf.to_container(cfg, resolve=True)) == stored
