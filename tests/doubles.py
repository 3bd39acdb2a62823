"""Drafter test doubles that know the target's true continuation."""

import mlx.core as mx


class _PositionCache:
    """Stands in for the drafter's KV cache: counts context positions seen."""

    def __init__(self):
        self.offset = 0

    def trim(self, n):
        n = min(n, self.offset)
        self.offset -= n
        return n

    def is_trimmable(self):
        return True


class ScriptedDraft:
    """Proposes ``sequence[pos]`` for every block position (or a wrong token if ``wrong``).

    ``sequence`` holds prompt + the target's greedy continuation, indexed by absolute
    position, so a correct script is always fully accepted.
    """

    def __init__(self, config, sequence, vocab_size, wrong=False):
        self.config = config
        self.sequence = list(sequence)
        self.vocab_size = vocab_size
        self.wrong = wrong

    def make_cache(self):
        return [_PositionCache()]

    def propose(self, model, block, context_hidden, cache):
        cache[0].offset += context_hidden.shape[1]
        start = cache[0].offset  # absolute position of block[0]
        width = block.shape[1]
        rows = []
        for pos in range(start + 1, start + width):
            tok = self.sequence[pos] if pos < len(self.sequence) else 0
            rows.append((tok + 1) % self.vocab_size if self.wrong else tok)
        return mx.eye(self.vocab_size)[mx.array(rows)] * 30.0
