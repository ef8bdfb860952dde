"""How much work each decode step of the graph path issues, counted on the CPU: the aten operators one
un-captured step dispatches (each is about one kernel launch in the captured CUDA graph), split into the
steps that end with a prune and the others. A CPU proxy for the launches a policy adds to the step; GPU
time is what the bench and the sweeps measure.

    python scripts/step_ops.py policy=snapkv
    python scripts/step_ops.py policy=refresh policy.refresh_select=attention policy.refresh_keep=score \\
        policy.refresh_budget=8
    python scripts/step_ops.py model=tiny_llama cache=static policy=streaming

Overrides are run.py's; these come first (any of them can be overridden): SmolLM2-135M, n_sink 4, window
64, R = 16, the first 200 wiki tokens, ring layout, the torch graph step un-captured on the CPU in float32.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamkv.backends.graph import GraphEvaluator  # noqa: E402
from streamkv.cli import compose_jobs  # noqa: E402
from streamkv.models import load_model  # noqa: E402
from streamkv.runner import load_token_ids, make_evaluator  # noqa: E402
from streamkv.validate import validate  # noqa: E402

DEFAULTS = ["model=smollm2_135m", "n_sink=4", "window=64", "compress_every=16", "dataset=wiki",
            "dataset.max_tokens=200", "cache=ring", "backend=cudagraph", "backend.capture=false", "device=cpu",
            "dtype=float32", "progress=false"]


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count(g: GraphEvaluator, ids: torch.Tensor, prefill: int) -> dict[bool, list[int]]:
    """Operators per decode step, keyed by whether the step ends with a prune."""
    out: dict[bool, list[int]] = collections.defaultdict(list)
    replay = g._replay

    def counted(t: int) -> None:
        c = CountOps()
        with c:
            replay(t)
        s = g.s  # the schedule (built by run): scored policies mark their prune steps, the others' evict rows
        pruned = bool(s.scored.prune[t]) if s.scored is not None else bool(s.evict_row[t] != 0)
        out[pruned].append(c.n)

    g._replay = counted
    g.run(ids, prefill)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides, e.g. policy=snapkv")
    args = ap.parse_args()
    cfg = compose_jobs(DEFAULTS + args.overrides)[0]
    validate(cfg)
    device = torch.device("cpu")
    loaded = load_model(cfg.model, device, torch.float32)
    ids = torch.tensor(load_token_ids(cfg.dataset, loaded.tokenizer, "step_ops"), dtype=torch.long)
    g = make_evaluator(cfg, loaded.model, len(ids), device, loaded.tokenizer)
    if not isinstance(g, GraphEvaluator):
        raise SystemExit(f"not a graph step: backend {cfg.backend.name} ran as {type(g).__name__}")
    steps = count(g, ids, int(cfg.prefill_tokens))
    label = " ".join(args.overrides) or "defaults"
    for pruned in (False, True):
        n = sorted(set(steps[pruned]))
        if n:
            print(f"{label}: steps {'with' if pruned else 'without'} a prune: {len(steps[pruned])}, "
                  f"operators per step {n[0]}" + (f"..{n[-1]}" if len(n) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
