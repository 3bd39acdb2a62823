"""Block sizes: the generation's pick after prefill, and each round's width.

``choose_block_size`` is the one place a generation's block size is decided (a fixed
size, or the policy's pick from the prefill). A schedule then gives each round's
width: ``Fixed`` keeps the pick, ``Refine`` moves it by the last round's outcome, and
``CostAware`` picks the width with the most expected tokens per second from acceptance
estimated online and this machine's measured round costs (``costs.calibrate``, corrected by
timed rounds: ``costs.LearnedCosts``), plain decoding (width 1) included; a session's
``Acceptance`` carries what earlier generations saw into the next one. Any width gives the
same output (each round is verified on its own), so schedules change speed only.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import mlx.core as mx

from .costs import LearnedCosts
from .options import AUTO, BlockSize, check_block_size

# How much faster (a fraction) a narrower width must be expected to be before the controller
# leaves the policy's pick when decoding greedily (``CostAware``'s ``trust``).
PICK_TRUST = 0.1


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

    def update(self, committed: int, width: int, context: int = 0, expected: Optional[Sequence[float]] = None) -> None:
        """A round of ``width`` committed ``committed`` tokens; ``context`` tokens are now cached;
        ``expected``: each draft's probability of being kept, when they were sampled (``Acceptance``)."""

    def observe(self, seconds: float) -> None:
        """The round of the last ``update`` took ``seconds`` (from the previous round's end)."""


class Refine(Fixed):
    """Start at the pick and move within ``[lo, hi]`` after each round (``refine_width``)."""

    def __init__(self, width: int, lo: int, hi: int):
        super().__init__(width)
        self.lo, self.hi = lo, hi

    def update(self, committed: int, width: int, context: int = 0, expected: Optional[Sequence[float]] = None) -> None:
        self.width = refine_width(self.width, committed, width, self.lo, self.hi)


class Acceptance:
    """How often the draft at each block position was accepted when the ones before it were:
    ``hits[k] / seen[k]`` at position ``k + 1``, moving averages that keep ``memory`` of
    their past per round (starting from ``hits`` and ``seen``, a prior)."""

    def __init__(self, memory: float, hits: Sequence[float] = (), seen: Sequence[float] = ()):
        self.memory, self.hits, self.seen = memory, list(hits), list(seen)

    def observe(self, accepted: int, drafted: int, expected: Optional[Sequence[float]] = None) -> None:
        """A round kept ``accepted`` of its ``drafted`` drafts (a round cut short by EOS or
        ``max_tokens`` undercounts: harmless). With sampled drafts, ``expected[k]`` is the
        probability that draft ``k + 1`` was kept given those before it; it is counted instead of
        the kept/rejected outcome (its average, without the coin's noise: at T = 0.7 on the demo
        half the variance), at the same positions (a draft after the first rejection was drafted
        after a rejected one, not a kept one)."""
        seen = min(accepted + 1, drafted)  # positions seen: the accepted ones and the first miss
        grow = max(0, seen - len(self.seen))
        self.hits, self.seen = self.hits + [0.0] * grow, self.seen + [0.0] * grow
        for k in range(seen):
            hit = (k < accepted) if expected is None else expected[k]
            self.hits[k] = self.memory * self.hits[k] + hit
            self.seen[k] = self.memory * self.seen[k] + 1

    def rates(self) -> list:
        return [h / s for h, s in zip(self.hits, self.seen)]


def session_acceptance() -> Acceptance:
    """A session's acceptance over its generations (kept beside the bundle's costs): a slow
    average, about the last 200 drafted rounds."""
    return Acceptance(memory=0.995)


@dataclass
class PlainStretch:
    """Consecutive plain rounds being timed (``CostAware.observe``)."""

    context: int  # tokens cached at its start
    seconds: float = 0.0  # its rounds' times
    rounds: int = 0
    window_context: int = 0  # the current window's (a window: rounds after the stretch's first)
    window_s: float = 0.0
    window: int = 0
    windowed: bool = False  # a full window was observed


class CostAware(Fixed):
    """Each round's width maximises expected committed tokens per second of round.

    Acceptance is estimated online per block position: ``rate[k]`` is how often the
    k-th draft was accepted when the ones before it were (a moving average starting from
    the session's ``acceptance`` when given, else from a blind prior, so few rounds
    already steer). With ``costs.round_s`` from calibration, a width ``w`` is worth
    ``(1 + rate[1] + rate[1]*rate[2] + ...) / round_s(w)`` tokens per second; width 1 is
    plain decoding. With ``costs.LearnedCosts`` the rounds' times (``observe``) correct
    the calibration, and a width next to the best one that was timed fewer than ``explore``
    times lately is tried (its cost may be a stale correction of an earlier session's load or
    of a slow spell, and a width believed too dear is otherwise never timed), plain decoding
    too while drafting at width 2 (a run of drafted rounds alone never tells what they cost
    against a plain step).
    Plain rounds teach nothing about drafting, so after ``probe_every`` of them one round drafts
    again at the best drafting width; where a drafted round costs much more than a plain step
    (long context), probes are spaced so that they cost at most ``probe_budget`` of the time
    even when they fail. Drafting is left for plain decoding only when plain decoding is expected
    faster by more than ``margin``: near break-even (sampling at T = 0.7 on the demo) estimates
    from a few noisy rounds swing across it, and a move to plain is slow to undo. Each probe
    after which decoding goes back to plain doubles the interval (up to ``2 ** backoff`` times;
    any other probe resets it): where drafting clearly does not pay (after a prompt of ~2k tokens
    here), failed probes stop costing the whole budget.

    A drafted round after plain ones first has the drafter read the ``unread`` features
    it has not seen (after a long prompt: all of them, ``costs.catch_up_s``). Drafting
    starts only when its expected saving over the next ``horizon`` tokens (at most the
    ``remaining`` ones) pays that back, and a probe only when the read costs no more than
    a plain step: at long context with a weak drafter, decoding stays plain.

    The width it starts from (the policy's pick) can be trusted: the controller then moves
    below it only for a width expected to be faster by more than ``trust`` (a fraction), since
    its estimates from a few noisy rounds are often wrong by that much and plain rounds teach
    it nothing; the decision to pay for a long read (after a long prompt) is taken on the
    estimates alone. ``make_schedule`` trusts the pick when decoding greedily only: the
    policy learned from greedy acceptance, which sampling does not reach.
    """

    def __init__(self, width: int, costs, max_width: int, context: int, unread: int = 0,
                 remaining: Optional[int] = None, prior: float = 0.5, prior_rounds: float = 2.0,
                 memory: float = 0.9, probe_every: int = 8, probe_budget: float = 0.03, horizon: int = 256,
                 acceptance: Optional[Acceptance] = None, session_rounds: float = 30.0, trust: float = PICK_TRUST,
                 plain_window: int = 16, explore: int = 3, sampled: bool = False, backoff: int = 3,
                 margin: float = 0.05):
        super().__init__(width)
        self.sampled = sampled  # rounds sample (T > 0): they cost what sampling adds too
        self.home, self.trust = width, trust
        self.costs, self.max_width, self.context = costs, max(2, max_width), context
        n = self.max_width - 1
        hits, seen = [prior * prior_rounds] * n, [prior_rounds] * n
        if acceptance is not None:  # the session's counts added, worth at most `session_rounds` rounds
            for k, (h, c) in enumerate(zip(acceptance.hits[:n], acceptance.seen)):
                weight = min(c, session_rounds)
                hits[k], seen[k] = hits[k] + weight * h / c, seen[k] + weight
        self.estimate, self.session = Acceptance(memory, hits, seen), acceptance
        self.last = None  # the last round: its width, context, the width of the round before it, unread features
        self.explore, self.tried = explore, {}  # width -> rounds tried by ``explored`` in this generation
        self.stretch: Optional[PlainStretch] = None  # the plain rounds since the last drafted one
        self.plain_window = plain_window
        self.probe_every, self.probe_budget, self.plain = probe_every, probe_budget, 0
        self.margin = margin
        # probes in a row after which decoding went back to plain; whether the next round is a probe
        self.backoff, self.failed, self.probing = backoff, 0, False
        self.unread, self.remaining, self.horizon = unread, remaining, horizon
        if isinstance(costs, LearnedCosts):
            costs.interrupt()  # this generation's rounds do not follow the last one's
        if width > 1 and not self.pays(width):
            self.width = 1

    def rates(self) -> list:
        return self.estimate.rates()

    def speeds(self) -> list:
        """Expected committed tokens per second at every width 1..max_width (index width - 1)."""
        out, expected, run = [], 1.0, 1.0
        for width, r in enumerate([None] + self.rates(), start=1):
            if r is not None:
                run *= r
                expected += run
            out.append(expected / self.round_s(width))
        return out

    def round_s(self, width: int) -> float:
        """What a round of ``width`` costs now (``costs.round_s`` at this context, sampled or not)."""
        return self.costs.round_s(width, self.context, self.sampled)

    def tokens_per_s(self, width: int) -> float:
        return self.speeds()[width - 1]

    def read_is_cheap(self) -> bool:
        """The drafter's read of the features it has not seen costs no more than a plain step."""
        return self.costs.catch_up_s(self.unread) <= self.round_s(1)

    def scores(self) -> list:
        """``speeds()`` with the widths below the pick lowered by ``trust``, and plain decoding
        by ``margin`` after a drafted round (by the larger of the two where both apply): the
        controller leaves the width it started from for a narrower one (or plain decoding) only
        when that is expected to be faster by more than ``trust``, and drafting for plain decoding
        only when that is faster by more than ``margin``. Narrower rounds observe fewer block
        positions, so a wrong move down is slow to undo (plain rounds observe none); a move up
        observes more and corrects itself. Not while a costlier read is due (after a long
        prompt): neither may pay for a measured cost."""
        speeds = self.speeds()
        if not self.read_is_cheap():
            return speeds
        scores = [s / (1 + self.trust) if w < self.home else s for w, s in enumerate(speeds, start=1)]
        if self.last is not None and self.last[0] > 1:  # the round just done drafted
            scores[0] = min(scores[0], speeds[0] / (1 + self.margin))
        return scores

    def pays(self, width: int, speeds: Optional[list] = None) -> bool:
        """Drafting at ``width`` beats plain decoding, its first round's read included
        (``speeds``: this update's ``scores()``, computed once)."""
        speeds = speeds or self.scores()
        plain, drafted = speeds[0], speeds[width - 1]
        if drafted <= plain:
            return False
        tokens = self.horizon if self.remaining is None else min(self.horizon, self.remaining)
        return tokens * (1 / plain - 1 / drafted) > self.costs.catch_up_s(self.unread)

    def probe_interval(self, width: int) -> int:
        """Plain rounds between probes at ``width``: a failed probe wastes what the round costs
        beyond a plain step, the drafter's read of the features it has not seen included (after
        a long prompt, the prompt's), so that over the interval stays within ``probe_budget``;
        doubled for each probe in a row that went back to plain (at most ``backoff`` times)."""
        extra = (self.round_s(width) + self.costs.catch_up_s(self.unread)) / self.round_s(1) - 1
        return max(self.probe_every, math.ceil(extra / self.probe_budget)) << min(self.failed, self.backoff)

    def observe(self, seconds: float) -> None:
        """With ``LearnedCosts``, the last round's time corrects what rounds of its width cost.

        A plain round is built on the previous one's lazy token before that one is waited for
        (``decode.generate_step``), so the time between two syncs holds the work of the round
        in flight, not of the one synced: here the first plain round after a drafted one waits
        for two rounds, the last one for little. Nothing is in flight where a stretch of plain
        rounds begins and ends, one round at every sync inside it, so a stretch is timed as a
        whole (when a drafted round ends it) or, when long, in windows of ``plain_window`` rounds
        between two syncs inside it (its rest, which ends short, is then dropped).
        A drafted round is timed less its drafter's read of the features it had not seen
        (``costs.catch_up_s`` prices that: after plain rounds, all of theirs), except a
        generation's first (it reads the prompt and finishes the prefill's last chunk)."""
        if self.last is None or not isinstance(self.costs, LearnedCosts):
            return
        width, context, before, unread = self.last
        stretch = self.stretch
        if width == 1:
            if stretch is None:
                stretch = self.stretch = PlainStretch(context)
            elif not stretch.window:
                stretch.window_context = context
            if stretch.rounds:  # not the stretch's first round: a window round
                stretch.window_s, stretch.window = stretch.window_s + seconds, stretch.window + 1
            stretch.seconds, stretch.rounds = stretch.seconds + seconds, stretch.rounds + 1
            if stretch.window == self.plain_window:
                self.costs.observe(1, stretch.window_context, stretch.window_s / stretch.window, stretch.window,
                                   self.sampled)
                stretch.window_s, stretch.window, stretch.windowed = 0.0, 0, True
            return
        if stretch is not None:
            if not stretch.windowed:
                self.costs.observe(1, stretch.context, stretch.seconds / stretch.rounds, stretch.rounds, self.sampled)
            self.stretch = None
        rest = seconds - self.costs.catch_up_s(unread)
        if before is not None and rest > 0:
            self.costs.observe(width, context, rest, sampled=self.sampled)

    def explored(self, width: int) -> int:
        """``width``, or a width next to it that was timed fewer than ``explore`` times lately
        (``LearnedCosts.recent``; and this generation tried fewer: profiling times nothing): a
        drafting width, or plain decoding next to width 2 while drafting. A run of drafted rounds
        otherwise never times what they cost against a plain step, since the load takes up what
        every round is off (after a ~2k prompt a calibration priced B=2 at 1.14x of plain and the
        controller drafted every round, at 0.86x of mlx-lm's speed). Not on a probe: it drafts."""
        if not isinstance(self.costs, LearnedCosts):
            return width
        lowest = 1 if self.last is not None and self.last[0] > 1 else 2  # plain only right after a drafted round
        for w in (width - 1, width + 1):
            if lowest <= w <= self.max_width and max(self.costs.recent(w), self.tried.get(w, 0)) < self.explore:
                self.tried[w] = self.tried.get(w, 0) + 1
                return w
        return width

    def update(self, committed: int, width: int, context: int = 0, expected: Optional[Sequence[float]] = None) -> None:
        self.last = (width, self.context, self.last[0] if self.last is not None else None, self.unread)
        self.context = context or self.context
        if self.remaining is not None:
            self.remaining -= committed
        if width == 1:
            self.unread += 1
        else:
            self.unread = committed  # the drafter read everything; this round's kept inputs wait
            for acceptance in (self.estimate, self.session):
                if acceptance is not None:
                    acceptance.observe(committed - 1, width - 1, expected)
        speeds = self.scores()
        drafting = max(range(2, self.max_width + 1), key=lambda w: speeds[w - 1])
        best = drafting if self.pays(drafting, speeds) else 1
        if self.probing:  # this round was a probe: it failed when decoding goes back to plain
            self.failed = self.failed + 1 if best == 1 else 0
        self.probing = False
        if best > 1:
            best = self.explored(best)
        self.plain = self.plain + 1 if best == 1 else 0
        if self.plain > self.probe_interval(drafting):
            self.plain = 0
            if self.read_is_cheap():
                best, self.probing = self.explored(drafting), True
        self.width = best


def make_schedule(width: int, block_size: BlockSize, policy, refine: bool, costs=None, max_width: int = 8,
                  context: int = 0, unread: int = 0, remaining: Optional[int] = None,
                  acceptance: Optional[Acceptance] = None, greedy: bool = True) -> Fixed:
    """The schedule of a generation whose block size was picked as ``width``: ``CostAware``
    when ``refine`` and calibrated ``costs`` are given (widths 1 to ``max_width``, the
    drafter's training block size: wider blocks are outside what it learned; or ``width``
    if larger; ``context`` tokens cached, ``unread`` of them not yet read by the drafter,
    ``remaining`` tokens at most to generate; the session's ``acceptance`` to start from and
    add to; the pick trusted and rounds priced greedy when ``greedy``, priced sampled when not),
    else ``Refine`` or ``Fixed``."""
    if refine and costs is not None:
        return CostAware(width, costs, max(max_width, width), context, unread, remaining, acceptance=acceptance,
                         trust=PICK_TRUST if greedy else 0.0, sampled=not greedy)
    if refine:
        return Refine(width, *refine_window(width, block_size, policy))
    return Fixed(width)
