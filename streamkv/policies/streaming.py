from __future__ import annotations

from streamkv.policies.base import Decision, Policy


class StreamingPolicy(Policy):
    """StreamingLLM: n_sink sinks + the `window` most recent tokens, pruned lazily.

    Prunes when the cache exceeds n_sink + window + compress_every - 1 tokens, i.e. every R steps
    in steady state; R = 1 is strict StreamingLLM (evict after every step).
    """

    name = "streaming"

    def decide(self, view):
        length = len(view.token_pos)
        if length <= self.n_sink + self.window + self.compress_every - 1:
            return None
        return Decision(keep=self.sink_and_recent(length, self.window))
