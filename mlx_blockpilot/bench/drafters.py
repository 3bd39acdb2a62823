"""Drafters that know the answer, for tests and benchmarks (they follow ``draft.Drafter``).

``ScriptedDraft`` proposes the target's true continuation (or, with ``wrong``, a token
that is never it) at every block position. With ``cost_of`` it also runs that real
drafter's pass and keeps it in the graph, so a round costs what a real round costs
while every draft is accepted: the engine's efficiency row of ``bench``.
"""

from typing import Any, List, Optional, Sequence

import mlx.core as mx

from ..draft import DraftConfig, Drafter


class PositionCache:
    """Stands in for a drafter's context cache: counts the context positions seen."""

    def __init__(self):
        self.offset = 0

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True


class ScriptedDraft:
    """Proposes ``sequence[pos]`` for every block position (``sequence`` = prompt + the
    target's continuation, by absolute position), or a wrong token when ``wrong``."""

    def __init__(self, config: DraftConfig, sequence: Sequence[int], vocab_size: int, wrong: bool = False,
                 cost_of: Optional[Drafter] = None):
        self.config = config
        self.sequence = list(sequence)
        self.vocab_size = vocab_size
        self.wrong = wrong
        self.cost_of = cost_of

    def make_cache(self) -> List[Any]:
        return self.cost_of.make_cache() if self.cost_of is not None else [PositionCache()]

    def draft_ids(self) -> None:
        return None  # the target's whole vocabulary: any true continuation can be proposed

    def propose(self, model, block: mx.array, context_hidden: Optional[mx.array], cache: List[Any]) -> mx.array:
        width = block.shape[1]
        if self.cost_of is not None:
            real = self.cost_of.propose(model, block, context_hidden, cache)
            start = cache[0].offset  # absolute position of block[0]: the context is everything before it
        else:
            cache[0].offset += 0 if context_hidden is None else context_hidden.shape[1]
            start = cache[0].offset
        rows = []
        for pos in range(start + 1, start + width):
            tok = self.sequence[pos] if pos < len(self.sequence) else 0
            rows.append((tok + 1) % self.vocab_size if self.wrong else tok)
        logits = (mx.arange(self.vocab_size)[None] == mx.array(rows)[:, None]).astype(mx.float32) * 30.0
        # 0 * (a column of the real logits) keeps the real pass in the graph
        return logits + 0 * real[:, :1] if self.cost_of is not None else logits


def true_continuation(draft: Drafter, sequence: Sequence[int], vocab_size: int) -> ScriptedDraft:
    """A drafter that costs what ``draft`` costs but proposes ``sequence`` (always accepted)."""
    return ScriptedDraft(draft.config, sequence, vocab_size, cost_of=draft)
