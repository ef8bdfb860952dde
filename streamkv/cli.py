"""Command-line glue around Hydra: check every override and every sweep combination before
anything runs (one line per mistake, no traceback), and print a readable summary."""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from streamkv.errors import ConfigError
from streamkv.policies import register_configs
from streamkv.policies.base import knob_defaults
from streamkv.record import run_identity
from streamkv.validate import context_warning, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "dataset", "cache", "policy", "backend", "hydra/launcher", "sweep")
MAX_COMBINATIONS = 100_000


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else " ".join(lines[:2])


def expand_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The job list Hydra's basic sweeper would make (choice/range sweeps, cartesian product)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes: dict[str, list[str]] = {}  # by key: a later override of a key replaces an earlier one
    for ov in parsed:
        key = ov.get_key_element()
        group = ov.key_or_group.lstrip("+~")
        if ov.is_sweep_override():
            if not multirun:
                raise ConfigError(f"{group}: a sweep ({ov.input_line.split('=', 1)[1]}) needs -m/--multirun")
            values = list(ov.sweep_string_iterator())
        else:
            values = [ov.get_value_element_as_str()] if not ov.is_delete() else [None]
        if group in GROUPS and values != [None]:
            allowed = group_options(group)
            for v in values:
                if v not in allowed:
                    raise ConfigError(f"{group}: unknown option '{v}' (allowed: {', '.join(allowed)})")
        axes[key] = [f"{key}={v}" if v is not None else ov.input_line for v in values]
    combos = 1
    for a in axes.values():
        combos *= len(a)
    if combos > MAX_COMBINATIONS:
        raise ConfigError(f"sweep: {combos} combinations is more than {MAX_COMBINATIONS}")
    return [list(c) for c in itertools.product(*axes.values())] if axes else [[]]


def preset_blocks(overrides: list[str]) -> list[list[str]]:
    """The override lists of a sweep: one per block of a preset using the `blocks` sweeper
    (conf/sweep/*.yaml), else [overrides + hydra.sweeper.params] as Hydra's basic sweeper does."""
    # hydra_plugins/ is found from the repository root only (it is not installed with the package)
    from hydra_plugins.streamkv_sweeper.blocks_sweeper import block_overrides

    fixed = [o for o in overrides if "," not in o.split("=", 1)[-1] and not o.lstrip("+~").startswith("hydra")]
    try:
        sweeper = compose(config_name="config", overrides=fixed, return_hydra_config=True).hydra.sweeper
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_first_line(exc)) from None
    return block_overrides(sweeper.get("blocks"), sweeper.get("params"), overrides)


def compose_jobs(argv: list[str]) -> list:
    """Compose every job of this command line (a sweep's union of products), as Hydra will."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    register_configs()
    cfgs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        blocks = preset_blocks(overrides) if multirun else [overrides]
        jobs, seen = [], set()
        for block in blocks:  # the union of the blocks' products, each job once
            for job in expand_overrides(block, multirun):
                if tuple(sorted(job)) not in seen:
                    seen.add(tuple(sorted(job)))
                    jobs.append(job)
        if len(jobs) > MAX_COMBINATIONS:
            raise ConfigError(f"sweep: {len(jobs)} jobs is more than {MAX_COMBINATIONS}")
        for job in jobs:
            # hydra.* settings are Hydra's own business (launcher, dirs); compose the run config only
            job_overrides = [o for o in job if not o.lstrip("+~").startswith("hydra")]
            try:
                cfgs.append(compose(config_name="config", overrides=job_overrides))
            except (HydraException, OmegaConfBaseException) as exc:
                raise ConfigError(_first_line(exc)) from None
    return cfgs


def precheck(argv: list[str]) -> list[str | None]:
    """Validate all jobs of this command line; raise ConfigError on the first bad one.
    Returns one identity per job (None where rerun=true: such a job never counts as done)."""
    identities: list[str | None] = []
    cfgs = compose_jobs(argv)
    for cfg in cfgs:
        validate(cfg)
        identities.append(None if cfg.rerun else run_identity(OmegaConf.to_container(cfg, resolve=True)))
    warn_context(cfgs)
    return identities


def warn_context(cfgs: list) -> None:
    """One stderr line if any job can exceed its model's trained context (streamkv.validate.context_warning)."""
    warnings = [w for w in map(context_warning, cfgs) if w]
    if warnings:
        more = f" ({len(warnings)} of {len(cfgs)} jobs, e.g. the first)" if len(cfgs) > 1 else ""
        print(f"warning: beyond the trained context{more}: {warnings[0]}", file=sys.stderr)


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def print_summary(payload: dict, run_dir, compact: bool = False) -> None:
    """One screen for a single run; one line per run inside a sweep."""
    cfg, m = payload["config"], payload["metrics"]
    pol = cfg["policy"]
    defaults = knob_defaults()  # knobs away from their neutral default
    knobs = ", ".join(f"{k}={v}" for k, v in pol.items() if k != "name" and v != defaults.get(k))
    answer = (f", answer acc {m['answer_acc']} (NLL {m['answer_nll']:.3f})"
              if m.get("answer_acc") is not None else "")
    if compact:
        print(f"ok  {pol['name']}{'(' + knobs + ')' if knobs else ''} n_sink={cfg['n_sink']} window={cfg['window']} "
              f"R={cfg['compress_every']} {cfg['cache']['name']}/{cfg['backend']['name']}: PPL {m['ppl']:.3f}, "
              f"TPOT {m['tpot_ms']:.3f} ms, {m['n_prunes']} prunes{answer}  -> {run_dir}", file=sys.stderr)
        return
    table = Table(title=f"streamkv run — {payload['status']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model / text", f"{cfg['model']['name']} / {cfg['dataset']['name']} "
                                  f"({payload['dataset']['n_tokens']} tokens)")
    table.add_row("policy", f"{pol['name']}" + (f" ({knobs})" if knobs else "")
                  + f", n_sink={cfg['n_sink']} window={cfg['window']} compress_every={cfg['compress_every']}")
    table.add_row("cache / backend", f"{cfg['cache']['name']} / {cfg['backend']['name']}")
    table.add_row("device", f"{payload['device']['name']} ({payload['device']['type']}, {payload['model']['dtype']})")
    table.add_row("PPL", f"{m['ppl']:.4f}  (mean NLL {m['nll_mean']:.5f} over "
                         f"{m['prefill_tokens'] + m['decode_tokens']} predicted tokens)")
    table.add_row("TPOT / TTFT", f"{m['tpot_ms']:.3f} ms / {m['ttft_ms']:.2f} ms  (prefill {m['prefill_ms']:.1f} ms)")
    table.add_row("step times", "  ".join(f"{label} {_ms(m.get(key))}" for label, key in (
        ("p50", "tpot_p50_ms"), ("p90", "tpot_p90_ms"), ("steady", "tpot_steady_ms"))) + "  (host, per decode step)")
    if m.get("answer_acc") is not None:
        table.add_row("pass key", f"answer acc {m['answer_acc']}, answer NLL {m['answer_nll']:.4f}, key "
                                  f"{payload['dataset'].get('passkey', {}).get('key', '?')} at distance "
                                  f"{m['key_distance']} tokens")
    context = m.get("model_context")
    beyond = "  BEYOND the model's context" if context is not None and (m.get("max_position") or 0) >= context else ""
    table.add_row("positions", f"max RoPE position {m.get('max_position')}, model context {context}{beyond}")
    table.add_row("visible KV", f"min {m['visible_kv_min']}, mean {m['visible_kv_mean']:.1f}, max {m['visible_kv_max']}")
    table.add_row("prunes", f"{m['n_prunes']} (dropped per prune: min {m['drop_min']}, median "
                            f"{m['drop_median']:g}, max {m['drop_max']})")
    table.add_row("peak memory", f"{m['peak_mem_mb']:.0f} MB")
    table.add_row("total", f"{m['total_s']:.1f} s")
    table.add_row("record", str(run_dir))
    Console(stderr=False).print(table)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def default_sweep_dir(args: list[str]) -> str:
    """multirun/<readable overrides>-<hash>: the same command lands in the same dir (resumable)."""
    overrides = sorted(a for a in args if not a.startswith("-") and "=" in a)
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9=,._+-]", "_", "_".join(overrides))[:80] or "defaults"
    return f"multirun/{slug}-{digest}"
