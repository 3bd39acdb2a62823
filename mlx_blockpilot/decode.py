"""Speculative decoding: prefill -> choose the block size -> rounds of draft/verify/accept.

``generate_step`` is the token-level generator of one generation (as mlx-lm's
``generate_step``): it prefills, asks the schedule for each round's width and yields
a ``Step`` with the tokens each round committed. ``stream_generate`` puts text and
statistics on top. A round with width B drafts B - 1 tokens in one drafter pass,
verifies ``[last, d1 .. d(B-1)]`` in one target pass, keeps the longest accepted
prefix plus one target token, and commits them to the prompt cache; it is one lazy
MLX graph evaluated with a single host sync.
"""

import os
import time
from dataclasses import dataclass
from typing import Dict, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import target
from .cache import PromptCache, make_cache
from .options import PREFILL_STEP_SIZE, GenerationOptions, check_prompt_length
from .draft import target_tokens
from .sampling import accept_greedy, accept_sampled, greedy_drafts, greedy_tokens, sample_draft, sample_target
from .schedule import choose_block_size, make_schedule

__all__ = ["GenerationResponse", "Prefill", "PromptCache", "Step", "generate", "generate_step", "make_cache",
           "policy_features", "prefill", "stream_generate"]


@dataclass
class Prefill:
    """What the prefill pass gives: the last prompt token's ``logits`` ``(V,)``, the tapped
    features ``hidden`` ``(1, n, F)`` of the ``n`` prompt tokens it ran, and how many
    prompt tokens the cache already held (``reused``); ``seconds`` from the start of the
    prefill to the first generated token (set by ``generate_step``)."""

    logits: mx.array
    hidden: Optional[mx.array]
    reused: int
    seconds: float = 0.0


@dataclass
class Step:
    """What ``generate_step`` yields: the prefill's first token, then one per round.

    ``width`` is the round's block size (0 for the prefill step); ``tokens`` are what it
    committed (its acceptance length is ``len(tokens)``, cut at EOS or ``max_tokens``).
    The first step carries the ``prefill``, the generation's ``block_size`` and the
    policy's time; ``timings`` (seconds of ``draft``, ``verify``, ``host``) only when asked for.
    """

    tokens: List[int]
    width: int = 0
    finish_reason: Optional[str] = None
    prefill: Optional[Prefill] = None
    block_size: Optional[int] = None
    policy_s: float = 0.0
    timings: Optional[Dict[str, float]] = None


def prefill(model, draft, cache: PromptCache, prompt: List[int], step: int = PREFILL_STEP_SIZE) -> Prefill:
    """Bring ``cache`` up to ``prompt``: reuse its shared prefix, run the target over the
    rest in chunks of ``step`` (as mlx-lm does) and commit it. The last chunk stays lazy."""
    reused = cache.reuse(prompt)
    tokens, ids = prompt[reused:], draft.config.target_layer_ids
    arr = mx.array(tokens)
    hidden = []
    start = 0
    while len(tokens) - start > 1:
        end = min(start + step, len(tokens) - 1)
        _, h = target.forward(model, arr[None, start:end], cache.target, ids)
        mx.eval([c.state for c in cache.target], h)
        hidden.append(h)
        start = end
        mx.clear_cache()
    logits, h = target.forward(model, arr[None, start:], cache.target, ids)
    hidden.append(h)
    hidden = mx.concatenate(hidden, axis=1) if hidden[0] is not None else None
    cache.commit(tokens, hidden, len(tokens))
    return Prefill(logits[0, -1], hidden, reused)


def policy_features(model, draft, logits: mx.array, hidden: mx.array, kind: str) -> mx.array:
    """What a policy reads after prefill, from that same pass: the last prompt token's
    logits, or its hidden state at the deepest layer the drafter taps."""
    if kind == "logits":
        return logits
    ids = list(draft.config.target_layer_ids)
    h = target.hidden_size(model)
    j = ids.index(max(ids))
    return hidden[0, -1, j * h : (j + 1) * h]


def _round(model, draft, cache: PromptCache, last: Union[int, mx.array], width: int, opts: GenerationOptions, key,
           timings=None):
    """One round's lazy graph: draft ``width - 1`` tokens, verify them, accept a prefix.

    ``last`` is the last committed token (a lazy array only for a plain round, ``width`` 1).
    Returns ``(drafted, accepted, next_token, hidden, replay, expected)``: the drafted tokens,
    how many of them the target accepts, the target's own next token, the verify pass's
    features, what the cache needs to take the pass back on linear-attention layers and, when
    sampling drafted tokens, each one's probability of being kept (``accept_sampled``; else None).
    """
    cfg = draft.config
    last_arr = last.reshape(1, 1) if isinstance(last, mx.array) else mx.array([[last]])
    tic = time.perf_counter()
    if width > 1:
        # The drafter sees [last, MASK, ...] and the committed context it has not read yet; its
        # logits and choices are over its own vocabulary (draft_ids), the drafted tokens target ids.
        block = mx.array([[last] + [cfg.mask_token_id] * (width - 1)])
        logits = draft.propose(model, block, cache.take_pending(), cache.draft)
        ids = draft.draft_ids()
        if opts.greedy:
            choices = greedy_drafts(logits)
        else:
            key, draft_key = mx.random.split(key)
            choices, draft_probs = sample_draft(logits, opts, draft_key)
        drafted = target_tokens(ids, choices)
        verify = mx.concatenate([last_arr, drafted[None].astype(last_arr.dtype)], axis=1)
    else:
        drafted, draft_probs = mx.zeros((0,), dtype=mx.int32), None
        verify = last_arr
    if timings is not None:  # profiling only: a sync between the two passes
        mx.eval(drafted)
        timings["draft"] = time.perf_counter() - tic if width > 1 else 0.0
        tic = time.perf_counter()
    # One target pass over [last, d1 .. d(B-1)]: logits[i] is the target's distribution
    # for the token after verify[i], so logits[:-1] judge d1..d(B-1) and logits[a] gives
    # the token after the accepted prefix of length a.
    replay, expected = [], None
    logits, hidden = target.forward(model, verify, cache.target, cfg.target_layer_ids, replay)
    if opts.greedy:  # keep d_i while it equals the target's argmax
        accepted, nxt = accept_greedy(drafted, logits[0])
    elif width == 1:  # plain decoding: a sample of the target's distribution
        accepted, nxt = mx.array(0), sample_target(logits[0, -1], opts, key)
    else:  # keep d_i with prob min(1, p/q); resample the first rejection from max(p - q, 0)
        accepted, nxt, expected = accept_sampled(choices, draft_probs, logits[0], opts, key, ids)
    if timings is not None:
        mx.eval(accepted, nxt, hidden)
        timings["verify"] = time.perf_counter() - tic
    return drafted, accepted, nxt, hidden, replay, expected


def generate_step(
    model: nn.Module,
    draft,
    prompt: List[int],
    options: GenerationOptions,
    *,
    eos: Sequence[int] = (),
    policy=None,
    prompt_cache: Optional[PromptCache] = None,
    timed: bool = False,
    costs=None,
    acceptance=None,
) -> Generator[Step, None, None]:
    """Generate from the token ids ``prompt``, yielding a ``Step`` per round.

    ``options.block_size`` must be resolved (an int, or ``"auto"`` with a ``policy``).
    Greedy output equals the target's own greedy decoding; with ``temperature > 0`` the
    output is distributed as the target's (speculative sampling). ``timed`` adds a sync
    after each pass to time it (profiling; slower). With ``options.refine`` and measured
    ``costs`` (``costs.calibrate``) each round's width maximises expected tokens per second;
    ``costs.LearnedCosts`` also learn from the rounds' times, and a session's ``acceptance``
    (``schedule.session_acceptance``) is where the controller starts and what it adds to.
    Closing the generator between steps leaves the cache holding exactly the committed tokens.
    """
    check_prompt_length(len(prompt), None)
    cache = prompt_cache if prompt_cache is not None else make_cache(model, draft)
    context = target.max_context(model)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
    key = mx.random.key(seed)
    eos = set(eos)
    max_tokens = options.max_tokens

    with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
        tic = time.perf_counter()
        pre = prefill(model, draft, cache, list(prompt), options.prefill_step_size)
        key, first_key = mx.random.split(key)
        first = greedy_tokens(pre.logits) if options.greedy else sample_target(pre.logits, options, first_key)
        last = first.item()
        pre.seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        width = choose_block_size(
            options.block_size, policy, lambda kind: policy_features(model, draft, pre.logits, pre.hidden, kind)
        )
        policy_s = time.perf_counter() - tic
        schedule = make_schedule(width, options.block_size, policy, options.refine, costs,
                                 max_width=draft.config.block_size, context=len(cache.tokens),
                                 unread=len(cache.tokens) - cache.drafted, remaining=max_tokens - 1,
                                 acceptance=acceptance, greedy=options.greedy)
        n = 1
        finish = "stop" if last in eos else "length" if max_tokens == 1 else None
        yield Step([last], 0, finish, pre, width, policy_s)
        if finish:
            return

        ahead = None  # the next plain round, already built (see below)

        def take_back(built) -> None:  # a plain round built ahead but not needed leaves the cache
            _, _, _, built_hidden, built_replay, _ = built
            cache.commit([], built_hidden, 1, built_replay)

        synced = time.perf_counter()  # when the last round's tokens reached the host

        def observe() -> None:  # the round's time, from the previous round's end to its own sync
            nonlocal synced
            now = time.perf_counter()
            if not timed:  # (profiling's extra syncs slow rounds down)
                schedule.observe(now - synced)
            synced = now

        try:
            while True:
                room = max_tokens - n
                if context is not None:
                    room = min(room, context - len(cache.tokens))
                if room <= 0:
                    yield Step([], 0, "length")
                    return
                w = min(schedule.width, room)
                key, round_key = mx.random.split(key)
                timings = {} if timed else None
                if w == 1 and not timed:
                    # A plain round commits `last` whatever the target says, so the next plain round can
                    # be built on this one's lazy next token before waiting for it: graph building then
                    # overlaps the computation, as in mlx-lm's generate_step. A round built ahead that is
                    # not needed (EOS, max_tokens, the generator closed) is taken back off the cache.
                    _, _, nxt, hidden, replay, _ = ahead or _round(model, draft, cache, last, 1, options, round_key)
                    ahead = None
                    cache.commit([last], hidden, 1, replay)
                    schedule.update(1, 1, len(cache.tokens))
                    if schedule.width == 1 and n + 1 < max_tokens and (context is None or len(cache.tokens) < context):
                        ahead = _round(model, draft, cache, nxt, 1, options, mx.random.split(key)[1])
                        mx.async_eval([x for x in ahead[2:4] if x is not None])
                    last = nxt.item()  # the round's one host sync
                    observe()
                    n += 1
                    finish = "stop" if last in eos else "length" if n >= max_tokens else None
                    if finish and ahead is not None:
                        take_back(ahead)
                        ahead = None
                    yield Step([last], 1, finish)
                    if finish:
                        return
                    continue
                drafted, accepted, nxt, hidden, replay, expected = _round(model, draft, cache, last, w, options,
                                                                          round_key, timings)
                tic = time.perf_counter()
                out = mx.concatenate([drafted.astype(mx.int32), accepted[None].astype(mx.int32), nxt[None].astype(mx.int32)])
                mx.eval(out, expected)  # the round's one host sync
                values = out.tolist()
                a = values[w - 1]
                new = (values[:a] + [values[w]])[: max_tokens - n]
                stop_at = next((i for i, t in enumerate(new) if t in eos), None)
                if stop_at is not None:
                    new = new[: stop_at + 1]
                # Of the w verify inputs [last, d1 ..], the committed ones stay: last + new[:-1].
                cache.commit([last] + new[:-1], hidden, w, replay)
                schedule.update(len(new), w, len(cache.tokens), None if expected is None else expected.tolist())
                observe()
                n += len(new)
                last = new[-1]
                finish = "stop" if stop_at is not None else "length" if n >= max_tokens else None
                if timings is not None:
                    timings["host"] = time.perf_counter() - tic
                yield Step(new, w, finish, timings=timings)
                if finish:
                    return
        finally:
            if ahead is not None:  # closed between steps: the cache holds exactly the committed tokens
                take_back(ahead)


@dataclass
class GenerationResponse:
    """What one step of ``stream_generate`` yields (stats are cumulative)."""

    text: str
    tokens: List[int]
    prompt_tokens: int
    generation_tokens: int
    block_size: int
    acceptance_lengths: List[int]
    round_widths: List[int]  # each round's block size (the controller may change it)
    prefill_s: float
    decode_tokens_per_s: float
    policy_s: float = 0.0
    finish_reason: Optional[str] = None
    peak_memory_gb: float = 0.0
    reused_tokens: int = 0

    @property
    def mean_acceptance(self) -> float:
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else 0.0


def stream_generate(
    model: nn.Module,
    draft,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    policy=None,
    prompt_cache: Optional[PromptCache] = None,
    costs=None,
    acceptance=None,
    **options,
) -> Generator[GenerationResponse, None, None]:
    """Generate from ``prompt`` (text or token ids), yielding a ``GenerationResponse`` per round.

    ``options`` are ``GenerationOptions`` fields (``max_tokens``, ``temperature``,
    ``top_p``, ``top_k``, ``seed``, ``block_size`` (an int or ``"auto"``; default: the
    drafter's training size, or ``"auto"`` with a ``policy``), ``refine``,
    ``prefill_step_size``). ``block_size`` in the responses is the generation's pick;
    ``costs`` (``costs.Costs``) make ``refine`` maximise expected tokens per second
    (``acceptance``: see ``generate_step``).
    """
    opts = GenerationOptions.from_kwargs(**options).resolve(draft.config.block_size, policy)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt) if prompt else []
    prompt = list(prompt)
    check_prompt_length(len(prompt), target.max_context(model))
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    lengths: List[int] = []
    widths: List[int] = []
    n = 0
    tic = time.perf_counter()
    first = None
    for step in generate_step(model, draft, prompt, opts, eos=eos, policy=policy, prompt_cache=prompt_cache, costs=costs,
                              acceptance=acceptance):
        if step.prefill is not None:
            first = step
            tic = time.perf_counter()
        elif step.tokens:
            lengths.append(len(step.tokens))
            widths.append(step.width)
        n += len(step.tokens)
        for t in step.tokens:
            if t not in eos:
                detokenizer.add_token(t)
        if step.finish_reason:
            detokenizer.finalize()
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=detokenizer.last_segment,
            tokens=list(step.tokens),
            prompt_tokens=len(prompt),
            generation_tokens=n,
            block_size=first.block_size,
            acceptance_lengths=list(lengths),
            round_widths=list(widths),
            prefill_s=first.prefill.seconds,
            decode_tokens_per_s=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            policy_s=first.policy_s,
            finish_reason=step.finish_reason,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            reused_tokens=first.prefill.reused,
        )


def generate(model, draft, tokenizer, prompt, **kwargs) -> GenerationResponse:
    """Run ``stream_generate`` to the end; the last response with all text and tokens."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, draft, tokenizer, prompt, **kwargs):
        text.append(last.text)
        tokens.extend(last.tokens)
    last.text, last.tokens = "".join(text), tokens
    return last
