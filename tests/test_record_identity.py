"""Finished runs stay findable: a committed record's identity equals the identity today's code gives the
same command line (a knob added later must not change it at its neutral value: record.LEGACY_VALUES)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "results" / "records"

def test_committed_record_identities_match_todays_config():
    """Every committed record (old ones made before most knobs existed, and new ones)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from streamkv.policies import register_configs
    from streamkv.record import run_identity

    runs = sorted(p.parent for p in RECORDS.glob("**/result.json") if (p.parent / ".hydra" / "overrides.yaml").exists())
    assert len(runs) > 400
    register_configs()
    wrong = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for d in runs:
            stored = json.loads((d / "result.json").read_text())["identity"]
            overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
            cfg = compose(config_name="config", overrides=overrides)
            if run_identity(OmegaConf.to_container(cfg, resolve=True)) != stored:
                wrong.append(str(d.relative_to(RECORDS)))
    assert not wrong, wrong[:5]
