"""Block sizes: the generation's pick after prefill, and each round's width.

``choose_block_size`` is the one place a generation's block size is decided (a fixed
size, or the policy's pick from the prefill). A schedule then gives each round's
width: ``Fixed`` keeps the pick, ``Refine`` moves it round by round. Any width gives
the same output (each round is verified on its own), so schedules change speed only.
"""

from typing import Callable, Tuple

import mlx.core as mx

from .options import AUTO, BlockSize, check_block_size


def choose_block_size(block_size: BlockSize, policy, features: Callable[[str], mx.array]) -> int:
    """The generation's block size: ``block_size``, or the policy's pick when it is ``"auto"``.

    ``features(kind)`` gives the prefill's features of that kind for the policy.
    """
    if check_block_size(block_size) == AUTO:
        from .policy import choose_block_size as policy_choice

        return policy_choice(policy, features(policy.config.input_kind))
    return block_size


def refine_window(width: int, block_size: BlockSize, policy) -> Tuple[int, int]:
    """The sizes ``Refine`` may move between: the policy's candidates, else ``width`` +/- 2."""
    if block_size == AUTO:
        return min(policy.config.block_sizes), max(policy.config.block_sizes)
    return max(1, width - 2), width + 2


def refine_width(width: int, accepted: int, drafted: int, lo: int, hi: int) -> int:
    """Next round's block size: grow after a fully accepted block, shrink when at most half was used."""
    if accepted >= drafted:
        return min(width + 1, hi)
    if 2 * accepted <= drafted:
        return max(width - 1, lo)
    return width


class Fixed:
    """Every round at the generation's block size."""

    def __init__(self, width: int):
        self.width = width

    def update(self, committed: int, width: int) -> None:
        """A round of ``width`` committed ``committed`` tokens."""


class Refine(Fixed):
    """Start at the pick and move within ``[lo, hi]`` after each round (``refine_width``)."""

    def __init__(self, width: int, lo: int, hi: int):
        super().__init__(width)
        self.lo, self.hi = lo, hi

    def update(self, committed: int, width: int) -> None:
        self.width = refine_width(self.width, committed, width, self.lo, self.hi)


def make_schedule(width: int, block_size: BlockSize, policy, refine: bool) -> Fixed:
    """The schedule of a generation whose block size was picked as ``width``."""
    if refine:
        return Refine(width, *refine_window(width, block_size, policy))
    return Fixed(width)
