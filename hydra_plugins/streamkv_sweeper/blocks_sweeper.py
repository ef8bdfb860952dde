"""A sweeper for named experiment plans: the union of several cartesian blocks.

Hydra's basic sweeper runs one cartesian product. A plan such as "strict streaming R=1 as the
baseline, plus max_drop x refresh at R in {32, 64}" is a union of products; a preset says so:

    defaults: [{override /hydra/sweeper: blocks}]
    hydra:
      sweeper:
        params: {repeat: "0,1"}                              # crossed with every block
        blocks:
          - {policy: streaming, compress_every: "1,32,64"}
          - {policy: max_drop, policy.max_drop: "256", compress_every: "32,64"}

Command-line overrides win over `params`, which win over a block's keys. Identical jobs are run
once. Everything else (batches, launchers) is Hydra's basic sweeper.
"""


from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


@dataclass
class BlocksSweeperConf:
    _target_: str = "hydra_plugins.streamkv_sweeper.blocks_sweeper.BlocksSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    blocks: Optional[List[Dict[str, str]]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="blocks", node=BlocksSweeperConf, provider="streamkv")


def block_overrides(blocks, params, arguments: List[str]) -> List[List[str]]:
    """One override list per block: block keys, then params, then the command line (last wins)."""
    params_list = [f"{k}={v}" for k, v in (params or {}).items()]
    return [[f"{k}={v}" for k, v in dict(block).items()] + params_list + list(arguments) for block in (blocks or [{}])]


class BlocksSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 blocks: Optional[List[Dict[str, str]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=None)
        self.block_params = params or {}
        self.blocks = blocks or [{}]

    def sweep(self, arguments: List[str]):
        # BasicSweeper.sweep parses `params + arguments` once; feed it all blocks' jobs instead
        self._arguments = arguments
        return super().sweep(arguments)

    def split_arguments(self, overrides, max_batch_size):  # noqa: D102 - see module docstring
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs, seen = [], set()
        for block in block_overrides(self.blocks, self.block_params, self._arguments):
            for job in BasicSweeper.split_arguments(parser.parse_overrides(block), None)[0]:
                key = tuple(sorted(job))
                if key not in seen:
                    seen.add(key)
                    jobs.append(job)
        n = max_batch_size or len(jobs)
        return [jobs[i:i + n] for i in range(0, len(jobs), n)]
