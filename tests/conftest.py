"""Shared helpers: compose a run config the way run.py does, load models once per session, and
run the evaluator in-process (fast) for the numerical tests."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
torch.set_num_threads(min(2, os.cpu_count() or 1))


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from streamkv.policies import register_configs
    from streamkv.validate import validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["device=cpu", "dtype=float32", *overrides])
    validate(cfg)
    return cfg


@functools.lru_cache(maxsize=4)
def load(kind: str):
    from omegaconf import OmegaConf

    from streamkv.models import load_model

    mcfg = compose(f"model={kind}").model
    return load_model(mcfg, torch.device("cpu"), torch.float32)


@functools.lru_cache(maxsize=8)
def text_ids(kind: str, name: str = "wiki", n: int = 400) -> torch.Tensor:
    from streamkv.corpora import load_text

    return torch.tensor(load(kind).tokenizer.encode(load_text(name))[:n])


def evaluate(kind: str, ids: torch.Tensor, *overrides: str, spy=None):
    """Run one config in-process on `ids`; returns the EvalResult. `spy(cache)` runs after each prune."""
    return evaluate_with_cache(kind, ids, *overrides, spy=spy)[0]


def evaluate_with_cache(kind: str, ids: torch.Tensor, *overrides: str, spy=None):
    """As `evaluate`, returning (EvalResult, the run's cache manager)."""
    from streamkv.runner import make_evaluator

    cfg = compose(f"model={kind}", *overrides)
    ev = make_evaluator(cfg, load(kind).model, len(ids), torch.device("cpu"), load(kind).tokenizer)
    if spy is not None:
        evict = ev.cache.evict

        def spying_evict(keep):
            evict(keep)
            spy(ev.cache)

        ev.cache.evict = spying_evict
    return ev.run(ids, cfg.prefill_tokens), ev.cache


def hf_nll(kind: str, ids: torch.Tensor) -> np.ndarray:
    """The oracle: one plain HF forward pass over the whole text."""
    with torch.inference_mode():
        logp = load(kind).model(ids[None]).logits[0].float().log_softmax(-1)
    return (-logp[:-1].gather(-1, ids[1:, None])[:, 0]).numpy()


def run_cli(*args: str, timeout: float = 600, cwd=ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([PYTHON, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


# The full manager x policy matrix takes tens of minutes on a 2-core machine. `make test` (CI)
# runs a representative subset: every manager with every policy on the ring manager, the main
# policies on soft_ring/static, SmolLM2 on ring only, one 20000-token run; `make test-full` runs all.
_SLOW = (
    ("test_cache_smollm2.py::", lambda n: "[ring-" not in n),
    ("test_cache.py::test_manager_equals_concat[", lambda n: "[ring-" not in n
     and not any(f"-{p}]" in n for p in ("streaming", "refresh", "h2o", "max_drop"))),
    ("test_cache.py::test_manager_equals_concat_more[", lambda n: not n.endswith("-ring]")),
    ("test_cache.py::test_random_keeps_match_concat[", lambda n: n.endswith("-1.3]")),
    ("test_cache.py::test_20000_tokens_equal_concat[", lambda n: "[ring-8]" not in n),
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: part of the full matrix only (make test-full)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(key in item.nodeid and rule(item.nodeid) for key, rule in _SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def one_thread():
    """The tiny models' ops are too small for intra-op threads; on a busy 2-core machine OpenMP waits make
    them up to 10x slower. One thread per test, restored after (`pytestmark = usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
