"""What a round costs on this machine: the target's verify pass and the drafter's pass,
measured by block width and context length, cached beside the bundle.

The per-round controller (``schedule.CostAware``) and the policy's throughput labels turn
acceptance into tokens per second with these costs. Measuring takes a few seconds: the
caches are filled with placeholder (zero) keys and values to the wanted context length, since
what attention costs does not depend on what the keys hold. The cached result is keyed by
machine, bundle, package versions and the code a round runs; any change measures again.
``LearnedCosts`` corrects the calibration by what real decoding rounds take (the machine's
load apart from how widths compare), and keeps its corrections in the cached file, so a
calibration that misjudged how widths compare is set right for later sessions too.
"""

import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, trim_prompt_cache

from . import target
from .draft import target_tokens
from .errors import BlockPilotError
from .options import GenerationOptions
from .sampling import accept_greedy, accept_sampled, greedy_drafts, sample_draft, sample_target

CALIBRATION_FILE = "calibration.json"
WIDTHS = (1, 2, 3, 4, 8)
CONTEXTS = (256, 2048, 8192)
LONG_WIDTHS = (2, 4)  # drafted widths timed past the shortest context (their passes take most of the time)
SAMPLING = GenerationOptions(temperature=1.0)  # what sampling adds to a round does not depend on the temperature


@dataclass
class Costs:
    """Seconds of a verify pass and of a draft pass, by context length (rows) and width (columns)."""

    widths: List[int]
    contexts: List[int]
    verify_s: List[List[float]]
    draft_s: List[List[float]]
    read_s: List[float] = field(default_factory=list)  # the drafter reading a context's features at once
    # what sampling (T > 0) adds to a round, by width: softmaxes over the vocabulary per verified
    # position, the same at any context length
    sample_s: List[float] = field(default_factory=list)
    key: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # how long measuring took
    # measured / calibrated round cost learned from decoding rounds (``LearnedCosts``), by context
    # length (one of ``contexts``) and width; a flat ``{width: factor}`` (files from before) holds at
    # every context
    corrections: Dict[int, Dict[int, float]] = field(default_factory=dict)

    def __post_init__(self):
        if self.corrections and not any(isinstance(r, dict) for r in self.corrections.values()):
            self.corrections = {c: dict(self.corrections) for c in self.contexts}
        if not all(isinstance(r, dict) for r in self.corrections.values()):
            raise TypeError("corrections mix factors by width with factors by context and width")

    def _at(self, table: List[List[float]], width: int, context: int) -> float:
        return _interpolate(self.contexts, [_interpolate(self.widths, row, width) for row in table], context)

    def round_s(self, width: int, context: int, sampled: bool = False) -> float:
        """One round at ``width`` with ``context`` tokens cached (width 1: a plain decoding step),
        ``sampled`` (T > 0) or greedy."""
        verify = self._at(self.verify_s, width, context)
        extra = _interpolate(self.widths, self.sample_s, width) if sampled and self.sample_s else 0.0
        return extra + (verify if width <= 1 else verify + self._at(self.draft_s, width, context))

    def catch_up_s(self, unread: int) -> float:
        """The drafter reading ``unread`` features it has not seen (the prompt's, or those of
        plain rounds) in its next pass: about linear in ``unread``."""
        if not self.read_s or unread <= 0:
            return 0.0
        return unread * _interpolate(self.contexts, [r / max(c, 1) for r, c in zip(self.read_s, self.contexts)], unread)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Costs":
        fields = {k: d[k] for k in ("widths", "contexts", "verify_s", "draft_s", "read_s", "sample_s", "key", "seconds")
                  if k in d}
        corrections = {int(k): {int(w): float(r) for w, r in v.items()} if isinstance(v, dict) else float(v)
                       for k, v in d.get("corrections", {}).items()}  # JSON keys are strings
        return cls(**fields, corrections=corrections)

    def measured(self) -> "Costs":
        """These costs as calibration measured them (without corrections)."""
        return replace(self, corrections={})


class LearnedCosts:
    """Calibrated ``costs`` corrected by the rounds decoding has timed since.

    Calibration times single passes on placeholder caches in a few seconds; real rounds on
    this machine differ by width (a step where the pass outgrows a kernel's tile), by context
    length (the demo's B=2 against plain was 1.21x / 1.03x / 0.89x of what a calibration said
    after ~35 / ~2k / ~4k tokens) and by the moment's load, which moves every width's rounds alike by
    10-50% over seconds. A round's measured / calibrated cost is therefore taken as a load
    level shared by all widths and contexts times the width's own correction at its context
    (``shape``, in logs): ``round_s(w, context)`` is the calibrated cost times
    ``ratio(w, context) = exp(level + shape(w, context))``. The level is what the last rounds
    saw, a moving average keeping ``memory`` per round (a run of plain rounds timed as one
    sets it). Shapes are learned only from a round timed right after a round of another width,
    at the load that one saw: the two widths' shapes take what it is off, each a share by how
    little is known of it (``1 / (pairs + 1)``, at least ``rate``). So the load of the moments
    a width happened to be timed at does not stick to it: learned as per-width medians of
    rounds timed at different moments, the corrections ended 9-20% off relative to plain in a
    logged run. A round off by more than ``clip`` (in logs: a pause) counts as off by ``clip``
    (a run of ``n`` rounds timed as one by ``n`` times that: a pause is diluted in it).

    Shapes are held at the calibration's context lengths and interpolated between them (flat
    past them), as the calibrated costs are; a round between two of them moves both, each by
    its share in the interpolation, so that the shape where it was timed moves as a round at
    a calibrated context moves it. A context never timed keeps the calibration as measured; a
    width never timed is priced like its timed neighbours (interpolated, flat past them).

    It starts from the ``corrections`` the calibration holds (as shapes, each worth ``prior``
    pairs). With ``path`` (the calibration's file), a correction ``exp(shape)`` is written back
    once this session timed its width ``keep_after`` times around its context and it moved
    more than ``tolerance`` from the kept one: the next session starts from it. Only how widths
    compare is learned; corrections are relative to each other. ``recent`` tells the
    controller how often a width was timed in the last ``max_age`` rounds (try it again when it
    was not). Kept on the bundle, it learns over a session's generations (``interrupt`` at each).
    """

    def __init__(self, costs: Costs, path=None, keep_after: int = 8, tolerance: float = 0.05, prior: int = 5,
                 rate: float = 0.05, memory: float = 0.5, clip: float = 0.5, max_age: int = 256):
        self.costs, self.path = costs, Path(path) if path else None
        self.keep_after, self.tolerance, self.max_age = keep_after, tolerance, max_age
        self.rate, self.memory, self.clip = rate, memory, clip
        self.contexts = list(costs.contexts)
        # context (of the calibration's) -> width -> log correction
        self.shapes: Dict[int, Dict[int, float]] = {
            c: {w: math.log(r) for w, r in costs.corrections.get(c, {}).items() if r > 0} for c in self.contexts}
        # context -> width -> pairs it was timed in (one width right after another), each counted
        # by the context's share; a kept correction counts as `prior`
        self.pairs: Dict[int, Dict[int, float]] = {c: {w: float(prior) for w in self.shapes[c]} for c in self.contexts}
        self.level = 0.0  # the load now: log measured / calibrated cost less shape, over the last rounds
        self.last: Optional[int] = None  # the width of the last round timed (None after a break)
        self.born: Dict[int, Deque[int]] = {}  # width -> when its rounds of the last max_age were timed
        self.timed: Dict[int, int] = {}  # width -> rounds timed here
        # context -> width -> rounds timed here that moved its shape (between it and its neighbours)
        self.timed_near: Dict[int, Dict[int, int]] = {c: {} for c in self.contexts}
        self.clock = 0  # rounds timed so far (a plain run timed as a whole counts its rounds)

    def observe(self, width: int, context: int, seconds: float, rounds: int = 1, sampled: bool = False) -> None:
        """A round of ``width`` with ``context`` tokens cached took ``seconds`` (the mean of
        ``rounds`` rounds timed together; ``sampled``: at T > 0)."""
        self.clock += rounds
        bound = self.clip * rounds  # a pause in a run of rounds timed as one is diluted in it
        level = math.log(max(seconds, 1e-12) / self.costs.round_s(width, context, sampled)) - self.shape(width, context)
        if self.last is None:  # the first round timed (since a break): the load is what it saw
            self.level, self.last = level, width
        off = _clip(level - self.level, bound)  # what this round is off the load the rounds before saw
        before, moved = self.last, [width]
        if before != width:  # timed right after another width: how the two compare at one load
            # each shape takes a share of what the round is off by how little is known of it (a
            # width with few pairs nearly all), together at most all of it; the load the rest
            gains = {w: max(self.rate, 1 / (self.pairs_at(w, context) + 1)) for w in (width, before)}
            scale = 1 / max(1.0, sum(gains.values()))
            self._move(context, {width: gains[width] * scale * off, before: -gains[before] * scale * off})
            off, moved = off * (1 - gains[width] * scale), [width, before]
        self.level += (1 - self.memory ** rounds) * off
        self.last = width
        self.born.setdefault(width, deque()).append(self.clock)
        for when in self.born.values():
            while when and self.clock - when[0] > self.max_age:
                when.popleft()
        self.timed[width] = self.timed.get(width, 0) + 1
        near = [c for c, _ in _shares(self.contexts, context)]
        for c in near:
            self.timed_near[c][width] = self.timed_near[c].get(width, 0) + 1
        if self.path is not None and any(self.worth_keeping(w, c) for w in moved for c in near):
            self.keep()

    def _move(self, context: int, steps: Dict[int, float]) -> None:
        """Move each width's shape at ``context`` by its step: the calibration's contexts around
        it by their shares, scaled so the interpolated shape there moves by the step."""
        shares = _shares(self.contexts, context)
        norm = sum(share * share for _, share in shares)
        for c, share in shares:
            start = {w: self._row(c, w) for w in steps}
            for w, step in steps.items():
                self.shapes[c][w] = start[w] + step * share / norm
                self.pairs[c][w] = self.pairs[c].get(w, 0.0) + share

    def interrupt(self) -> None:
        """The next round timed does not follow the last one (a new generation: its prefill and
        the time between came in between, and its first round is not timed): it is not paired
        with it, and sets the load."""
        self.last = None

    def _row(self, c: int, width: int) -> float:
        """Width ``width``'s shape at the calibration's context ``c``."""
        row = self.shapes[c]
        if not row:
            return 0.0
        known = sorted(row)
        return _interpolate(known, [row[w] for w in known], width, extend=False)

    def shape(self, width: int, context: int) -> float:
        """Width ``width``'s correction of the calibration (log) at ``context``, apart from the load."""
        return sum(share * self._row(c, width) for c, share in _shares(self.contexts, context))

    def pairs_at(self, width: int, context: int) -> float:
        """How many pairs ``width`` was timed in near ``context`` (by the shares of the calibration's contexts)."""
        return sum(share * self.pairs[c].get(width, 0.0) for c, share in _shares(self.contexts, context))

    def recent(self, width: int) -> int:
        """How many of the rounds timed in the last ``max_age`` were at ``width``."""
        return len(self.born.get(width, ()))

    def worth_keeping(self, width: int, context: int) -> bool:
        """``width`` was timed ``keep_after`` times between the calibration's context
        ``context`` and its neighbours and its correction there moved more than ``tolerance``
        from the kept one."""
        kept = self.costs.corrections.get(context, {}).get(width, 1.0)
        return (width in self.shapes[context] and self.timed_near[context].get(width, 0) >= self.keep_after
                and abs(math.exp(self.shapes[context][width]) / kept - 1) > self.tolerance)

    def learned(self) -> Dict[int, Dict[int, float]]:
        """The corrections to keep, by context and width: the kept ones, with those worth keeping."""
        out = {c: dict(row) for c, row in self.costs.corrections.items()}
        for c, row in self.shapes.items():
            for w, s in row.items():
                if self.worth_keeping(w, c):
                    out.setdefault(c, {})[w] = math.exp(s)
        return out

    def keep(self) -> None:
        """Write ``learned()`` into the calibration file, unless it now holds another
        calibration (measured again meanwhile); a file that cannot be written is warned about
        once and the corrections last this session only."""
        try:
            on_disk = Costs.from_dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            on_disk = None
        if on_disk is None or on_disk.measured() != self.costs.measured():
            self.path = None
            return
        self.costs = replace(self.costs, corrections=self.learned())
        try:
            write_costs(self.costs, self.path)
        except BlockPilotError as e:
            warnings.warn(f"{e}; the learned round costs last this session only", stacklevel=2)
            self.path = None

    def ratio(self, width: int, context: int) -> float:
        """A round of ``width`` at ``context`` now over its calibrated cost: the load level times
        the width's correction there."""
        return math.exp(self.level + self.shape(width, context))

    def round_s(self, width: int, context: int, sampled: bool = False) -> float:
        return self.costs.round_s(width, context, sampled) * self.ratio(width, context)

    def catch_up_s(self, unread: int) -> float:
        """The drafter's read at the load now (a pass like any other, slowed as they are: priced
        apart from it, a plain step and the read of ~2k features traded places with the load)."""
        return self.costs.catch_up_s(unread) * math.exp(self.level)


def _clip(x: float, bound: float) -> float:
    return max(-bound, min(bound, x))


def _shares(xs: Sequence[float], x: float) -> List[Any]:
    """``(point, share)`` of the points of ``xs`` that piecewise-linear interpolation at ``x``
    weighs (flat outside: all on the nearest end)."""
    if x <= xs[0]:
        return [(xs[0], 1.0)]
    if x >= xs[-1]:
        return [(xs[-1], 1.0)]
    i = next(i for i in range(1, len(xs)) if x <= xs[i])
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return [(p, share) for p, share in ((xs[i - 1], 1 - t), (xs[i], t)) if share > 0]


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float, extend: bool = True) -> float:
    """Piecewise-linear through ``(xs, ys)``: flat before the first point, extended linearly
    past the last one but never below it (a noisy measurement must not extrapolate to 0 s;
    flat there too unless ``extend``)."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if not extend and x >= xs[-1]:
        return ys[-1]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(y, ys[-1]) if x > xs[-1] else y


def _fill(caches: List[Any], length: int) -> None:
    """Grow every attention cache to ``length`` positions of placeholder keys and values (timing only)."""
    for c in caches:
        if isinstance(c, KVCache) and c.keys is not None and c.offset < length:
            b, h, _, d = c.keys.shape
            k = mx.zeros((b, h, length - c.offset, d), dtype=c.keys.dtype)
            v = mx.zeros((b, h, length - c.offset, c.values.shape[-1]), dtype=c.values.dtype)
            c.update_and_fetch(k, v)
            mx.eval(c.keys, c.values)


def _median_s(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _sampling_s(model, draft, width: int, reps: int) -> float:
    """What sampling adds to a round of ``width``: its draws and ``accept_sampled`` (softmaxes
    over the vocabulary per verified position) against the greedy choices, on placeholder logits
    of the round's shapes. Greedy timings miss it: on the demo it made drafted rounds 3-9% dearer
    relative to plain ones. It is timed apart because as the difference of two whole rounds it
    drowned in their noise (0-8 ms at B=2 across three calibrations)."""
    ids = draft.draft_ids()
    vocab = target.vocab_size(model)
    verified = mx.zeros((width, vocab))
    drafts = mx.zeros((max(width - 1, 1), vocab if ids is None else ids.size))
    key = mx.random.key(0)
    mx.eval(verified, drafts)

    def greedy():
        if width == 1:
            return mx.eval(mx.argmax(verified[-1]))
        return mx.eval(*accept_greedy(greedy_drafts(drafts), verified))

    def sampled():
        if width == 1:
            return mx.eval(sample_target(verified[-1], SAMPLING, key))
        choices, probs = sample_draft(drafts, SAMPLING, key)
        accepted, nxt, expected = accept_sampled(choices, probs, verified, SAMPLING, key, ids)
        mx.eval(accepted, nxt, expected)
        expected.tolist()  # the controller reads the expected acceptance on the host

    greedy(), sampled()  # warm-up
    return max(0.0, _median_s(sampled, reps) - _median_s(greedy, reps))


def _take_back(model, caches: List[Any], written: int, replay: List[Any]) -> None:
    """Take a timed pass of ``written`` positions off the target's caches: attention layers
    trimmed, linear-attention layers back to their state before it."""
    for c in caches:
        if c.is_trimmable():
            c.trim(written)
    target.rewind_linear(model, replay, 0)


def _plain_step_s(model, caches: List[Any], ids, token: int, steps: int) -> float:
    """Seconds per plain decoding step when each step is built on the previous one's lazy
    next token before waiting for it (as ``decode.generate_step`` runs them); the caches are
    left as they were."""
    replay: List[Any] = []
    tic = time.perf_counter()
    nxt = mx.array([[token]])
    for i in range(steps):
        logits, h = target.forward(model, nxt.reshape(1, 1), caches, ids, replay if i == 0 else None)
        built, nxt = nxt, mx.argmax(logits[0, -1]).astype(mx.int32)
        mx.async_eval(nxt, h)
        if i:
            built.item()
    nxt.item()
    seconds = (time.perf_counter() - tic) / steps
    _take_back(model, caches, steps, replay)
    return seconds


def measure(model, draft, widths: Sequence[int] = WIDTHS, contexts: Sequence[int] = CONTEXTS, reps: int = 1,
            progress: Optional[Callable[[str], None]] = None, plain_steps: int = 4,
            long_widths: Sequence[int] = LONG_WIDTHS, sample_reps: int = 7) -> Costs:
    """Time rounds at every width and context length as decoding runs them (the median of
    ``reps``, after one pass per context that warms its buffers up): a drafted round as one
    graph (its draft pass also alone, the rest is the verify pass's), a plain step (width 1)
    pipelined over ``plain_steps`` steps, and the drafter reading a whole context's features.
    Drafted widths lie on a straight line per context (``straight``); past the shortest context
    only the plain step and the drafted ``long_widths`` are timed, the others read off that line
    (at 8k tokens a round takes 2-6 plain steps of the short context: timing every width there
    took half the time). What sampling (T > 0) adds to a round at each width is timed apart
    (``_sampling_s``, the median of ``sample_reps``)."""
    tic = time.perf_counter()
    limit = target.max_context(model)
    contexts = sorted({min(c, limit - max(widths) - 1) if limit else c for c in contexts})
    ids = draft.config.target_layer_ids
    mask = draft.config.mask_token_id
    seed = [5] * 8
    verify_s, draft_s, read_s = [], [], []
    for n, length in enumerate(contexts):
        if progress:
            progress(f"calibrating: context {length} ({n + 1}/{len(contexts)})")
        timed = [w for w in widths if n == 0 or w == 1 or w in long_widths]  # a plain step is not on the line
        if len([w for w in timed if w > 1]) < 2:  # too few drafted widths for a line: all of them
            timed = list(widths)
        caches = target.make_cache(model)
        _, hidden = target.forward(model, mx.array([seed]), caches, ids)
        _fill(caches, length)
        dcache = draft.make_cache()
        mx.eval(draft.propose(model, mx.array([[seed[0], mask]]), hidden, dcache))
        # Reading a context's features at once, less a pass that reads one (what the read adds).
        pair = mx.array([[seed[0], mask]])
        reads = []
        for features in (mx.zeros((1, length, hidden.shape[-1]), dtype=hidden.dtype), hidden[:, :1]):
            mx.eval(features)
            start = time.perf_counter()
            mx.eval(draft.propose(model, pair, features, dcache))
            reads.append(time.perf_counter() - start)
            trim_prompt_cache(dcache, dcache[0].offset - 1)
        read_s.append(max(0.0, reads[0] - reads[1]))
        _fill(dcache, length)
        v_row, d_row = [], []
        for w in timed:
            tokens = mx.array([[seed[0]] * w])

            def verify(tokens=tokens, draft_of=None):
                """A verify pass over ``tokens`` (after the drafter's pass ``draft_of``, in one
                graph with one sync, as a decoding round runs them), then taken back."""
                replay = []
                if draft_of is not None:
                    choices = greedy_drafts(draft.propose(model, draft_of, ctx, dcache))
                    drafted = target_tokens(draft.draft_ids(), choices)
                    tokens = mx.concatenate([tokens[:, :1], drafted[None].astype(tokens.dtype)], axis=1)
                logits, h = target.forward(model, tokens, caches, ids, replay)
                mx.eval(logits, h)
                _take_back(model, caches, w, replay)
                if draft_of is not None:
                    trim_prompt_cache(dcache, 1)

            ctx = hidden[:, :1]
            if w == timed[0]:
                verify()  # warm-up: the context's buffers are allocated here
            if w == 1:
                v_row.append(_plain_step_s(model, caches, ids, seed[0], plain_steps))
                d_row.append(0.0)
                continue
            block = mx.array([[seed[0]] + [mask] * (w - 1)])

            def draft_pass():
                mx.eval(draft.propose(model, block, ctx, dcache))
                trim_prompt_cache(dcache, 1)

            # Each width warmed up first: a shape's first pass allocates its buffers, and timed cold
            # (one sample) it put B=2 at 1.41-1.46 plain steps where decoding rounds took 1.29.
            draft_pass()
            d_row.append(_median_s(draft_pass, reps))
            verify(draft_of=block)
            # the verify pass's share of a whole round (draft and verify in one graph)
            v_row.append(max(0.0, _median_s(lambda: verify(draft_of=block), reps) - d_row[-1]))
        # Plain steps are timed pipelined, drafted rounds as one graph each: a line through the latter.
        verify_s.append(by_width(widths, timed, v_row))
        draft_s.append(by_width(widths, timed, d_row))
    verify_s, draft_s = monotone(verify_s), monotone(draft_s)
    read_s = list(itertools.accumulate(read_s, max))
    sample_s = list(itertools.accumulate((_sampling_s(model, draft, w, sample_reps) for w in widths), max))
    return Costs(list(widths), contexts, verify_s, draft_s, read_s, sample_s, seconds=time.perf_counter() - tic)


def by_width(widths: Sequence[int], timed: Sequence[int], row: Sequence[float]) -> List[float]:
    """A context's ``row`` timed at ``timed`` as a value at every one of ``widths``: width 1
    (a plain step) as timed, the drafted widths on the line through the drafted ones."""
    drafted = [(w, y) for w, y in zip(timed, row) if w > 1]
    line = straight([w for w, _ in drafted], [y for _, y in drafted], at=[w for w in widths if w > 1])
    return ([row[list(timed).index(1)]] if 1 in widths else []) + line


def straight(xs: Sequence[float], ys: Sequence[float], at: Optional[Sequence[float]] = None) -> List[float]:
    """The Theil-Sen line through ``(xs, ys)`` (the median of pairwise slopes, never negative;
    the median intercept) at ``at`` (default ``xs``): a pass's cost is about linear in its width
    here, and one noisy sample of single timings moves the median, not the line."""
    at = list(xs) if at is None else list(at)
    if len(xs) < 2:  # one point: flat
        return [ys[0] if ys else 0.0] * len(at)
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    slope = max(0.0, statistics.median(slopes))
    base = statistics.median(y - slope * x for x, y in zip(xs, ys))
    return [base + slope * x for x in at]


def monotone(table: List[List[float]]) -> List[List[float]]:
    """``table`` (contexts x widths) made non-decreasing along both axes by running maxima: a
    wider or longer pass never costs less, so a dip is timing noise of a single sample."""
    rows = [list(itertools.accumulate(row, max)) for row in table]
    for j in range(len(rows[0]) if rows else 0):
        for i in range(1, len(rows)):
            rows[i][j] = max(rows[i][j], rows[i - 1][j])
    return rows


def machine_key() -> Dict[str, Any]:
    """What makes costs measured elsewhere invalid here."""
    import mlx_lm

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "device": str(mx.default_device()),
        "blas": os.environ.get("LD_PRELOAD", ""),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_blockpilot": __version__,
        "round_code": round_code(),
        # drafted rounds as one graph, each width warmed up (a straight line by width; widths 1, 2,
        # 4 past the shortest context), plain steps pipelined, reads, sampled rounds
        "method": 7,
    }


def round_code() -> str:
    """A fingerprint of the code a decoding round runs: what a round costs changes with it, and
    the package version does not always (a checkout, an edit)."""
    from . import cache, decode, draft, sampling, target

    h = hashlib.sha256()
    for module in (cache, decode, draft, sampling, target):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def bundle_key(bundle) -> str:
    """A fingerprint of the target and drafter the bundle was loaded from (their configs and
    weight files: a 4-bit and a bf16 copy of one model differ)."""
    h = hashlib.sha256()
    root = Path(bundle.path) if bundle.path else None
    folders = {"target": bundle.target_dir or (root / "target" if root else None),
               "draft": bundle.draft_dir or (root / "draft" if root else None)}
    for part, folder in folders.items():
        if folder is None or not Path(folder).is_dir():
            continue
        for f in sorted(Path(folder).iterdir()):
            stat = f.stat()
            h.update(f"{part}/{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    h.update(json.dumps(bundle.draft.config.to_dict(), sort_keys=True).encode())
    h.update(str(target.num_layers(bundle.model)).encode())
    return h.hexdigest()[:16]


def cache_path(bundle) -> Path:
    """``bundle/calibration.json`` when the bundle folder is writable, else the user cache."""
    if bundle.path is not None and os.access(bundle.path, os.W_OK):
        return Path(bundle.path) / CALIBRATION_FILE
    from .demo import cache_dir

    return cache_dir() / "calibration" / f"{bundle_key(bundle)}.json"


def read_costs(path) -> Costs:
    """The costs saved in ``path`` (whatever machine measured them)."""
    try:
        return Costs.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise BlockPilotError(f"calibration file {path} does not exist; run python -m mlx_blockpilot.calibrate") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BlockPilotError(f"cannot read calibration file {path} ({e})") from None


def load_costs(bundle, path=None) -> Optional[Costs]:
    """The cached costs of ``bundle`` on this machine, or None when there are none (or stale ones)."""
    path = Path(path) if path else cache_path(bundle)
    if not path.is_file():
        return None
    try:
        costs = Costs.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    key = dict(machine_key(), bundle=bundle_key(bundle))
    return costs if costs.key == key else None


def calibrate(bundle, path=None, force: bool = False, progress: Optional[Callable[[str], None]] = None) -> Costs:
    """The bundle's costs on this machine: cached ones, or measured now and cached."""
    costs = None if force else load_costs(bundle, path)
    if costs is not None:
        return costs
    costs = measure(bundle.model, bundle.draft, progress=progress)
    costs.key = dict(machine_key(), bundle=bundle_key(bundle))
    write_costs(costs, Path(path) if path else cache_path(bundle))
    return costs


def write_costs(costs: Costs, path: Path) -> None:
    """Save ``costs`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(costs.to_dict(), indent=1) + "\n")
            os.chmod(tmp, 0o644)  # as a plain write would leave it, not mkstemp's owner-only
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise BlockPilotError(f"cannot save the calibration to {path} ({e.strerror or e})") from None
