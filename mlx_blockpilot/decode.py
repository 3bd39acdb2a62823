"""Speculative decoding: prefill -> choose the block size -> rounds of draft/verify/accept.

A round with block size B drafts B - 1 tokens in one drafter pass, verifies
``[last, d1 .. d(B-1)]`` in one target pass, keeps the longest accepted prefix plus
one target token, and trims the target's KV cache back to the committed tokens.
The round is one lazy MLX graph evaluated with a single host sync.
"""

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import common_prefix_len

from . import target
from .errors import BlockPilotError
from .sampling import SamplingParams, accept_greedy, accept_sampled, greedy_tokens, probabilities, sample

BlockSize = Union[int, str]


@dataclass
class GenerationResponse:
    """What one step of ``stream_generate`` yields (stats are cumulative)."""

    text: str
    tokens: List[int]
    prompt_tokens: int
    generation_tokens: int
    block_size: int
    acceptance_lengths: List[int]
    prefill_s: float
    decode_tokens_per_s: float
    policy_s: float = 0.0
    finish_reason: Optional[str] = None
    peak_memory_gb: float = 0.0

    @property
    def mean_acceptance(self) -> float:
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else 0.0


@dataclass
class PromptCache:
    """Everything a generation leaves behind for the next one (multi-turn chat).

    ``tokens`` are the ids whose K/V sit in the target cache; the drafter has seen
    the first ``draft[0].offset`` of them and ``pending`` holds the target hidden
    states of the rest.
    """

    target: List[Any]
    draft: List[Any]
    tokens: List[int] = field(default_factory=list)
    pending: Optional[mx.array] = None


def make_cache(model: nn.Module, draft) -> PromptCache:
    return PromptCache(make_prompt_cache(model), draft.make_cache())


def _reuse(cache: PromptCache, prompt: List[int]) -> int:
    """Trim ``cache`` to the longest prefix it shares with ``prompt``; return its length."""
    keep = min(common_prefix_len(cache.tokens, prompt), len(prompt) - 1)
    drafted = cache.draft[0].offset if cache.draft else 0
    have_pending = 0 if cache.pending is None else cache.pending.shape[1]
    if drafted + have_pending != len(cache.tokens) or not all(c.is_trimmable() for c in cache.target):
        keep = 0
    for c in cache.target:
        c.trim(c.offset - keep)
    if drafted > keep:
        for c in cache.draft:
            c.trim(drafted - keep)
        cache.pending = None
    elif cache.pending is not None:
        cache.pending = cache.pending[:, : keep - drafted] if keep > drafted else None
    cache.tokens = cache.tokens[:keep]
    return keep


def _prefill(model, tokens: List[int], cache: PromptCache, layer_ids, step: int):
    """Run the target over ``tokens`` in chunks (as mlx-lm does): last-token logits."""
    arr = mx.array(tokens)
    hidden = [] if cache.pending is None else [cache.pending]
    start = 0
    while len(tokens) - start > 1:
        end = min(start + step, len(tokens) - 1)
        _, h = target.forward(model, arr[None, start:end], cache.target, layer_ids)
        mx.eval([c.state for c in cache.target], h)
        hidden.append(h)
        start = end
        mx.clear_cache()
    logits, h = target.forward(model, arr[None, start:], cache.target, layer_ids)
    hidden.append(h)
    cache.tokens.extend(tokens)
    cache.pending = mx.concatenate(hidden, axis=1) if hidden[0] is not None else None
    return logits[0, -1]


def policy_features(model, draft, logits: mx.array, hidden: mx.array, kind: str) -> mx.array:
    """What a policy reads after prefill, from that same pass: the last prompt token's
    logits, or its hidden state at the deepest layer the drafter taps."""
    if kind == "logits":
        return logits
    ids = list(draft.config.target_layer_ids)
    h = target.hidden_size(model)
    j = ids.index(max(ids))
    return hidden[0, -1, j * h : (j + 1) * h]


def choose_block_size(block_size: BlockSize, policy, features: Callable[[str], mx.array]) -> int:
    """The one place where a generation's block size is decided (after prefill).

    ``features(kind)`` gives the prefill's features of that kind for the policy.
    """
    if block_size == "auto":
        if policy is None:
            raise BlockPilotError("block size 'auto' needs a policy; pass --block-size N or a bundle with a policy")
        from .policy import choose_block_size as policy_choice

        return policy_choice(policy, features(policy.config.input_kind))
    if not isinstance(block_size, int) or block_size < 1:
        raise BlockPilotError(f"block size must be an integer >= 1 or 'auto', got {block_size!r}")
    return block_size


def refine_window(width: int, block_size: BlockSize, policy) -> Tuple[int, int]:
    """The sizes ``refine`` may move between: the policy's candidates, else ``width`` +/- 2."""
    if block_size == "auto":
        return min(policy.config.block_sizes), max(policy.config.block_sizes)
    return max(1, width - 2), width + 2


def refine_width(width: int, accepted: int, drafted: int, lo: int, hi: int) -> int:
    """Next round's block size: grow after a fully accepted block, shrink when at most half was used.

    Any block size gives the same output (each round is verified on its own), so this
    only changes speed.
    """
    if accepted >= drafted:
        return min(width + 1, hi)
    if 2 * accepted <= drafted:
        return max(width - 1, lo)
    return width


def _draft_round(model, draft, cache: PromptCache, last: int, width: int, params: SamplingParams, key):
    """Build one round's lazy graph; return (drafted, accepted, next_token, hidden)."""
    cfg = draft.config
    last_arr = mx.array([[last]])
    if width > 1:
        block = mx.array([[last] + [cfg.mask_token_id] * (width - 1)])
        logits = draft.propose(model, block, cache.pending, cache.draft)
        cache.pending = None
        if params.greedy:
            drafted = greedy_tokens(logits)
        else:
            draft_probs = probabilities(logits, params)
            key, draft_key = mx.random.split(key)
            drafted = sample(draft_probs, draft_key)
        verify = mx.concatenate([last_arr, drafted[None].astype(last_arr.dtype)], axis=1)
    else:
        drafted = mx.zeros((0,), dtype=mx.int32)
        draft_probs = mx.zeros((0, target.vocab_size(model)))
        verify = last_arr
    logits, hidden = target.forward(model, verify, cache.target, cfg.target_layer_ids)
    if params.greedy:
        accepted, nxt = accept_greedy(drafted, logits[0])
    else:
        accepted, nxt = accept_sampled(drafted, draft_probs, logits[0], params, key)
    return drafted, accepted, nxt, hidden


def stream_generate(
    model: nn.Module,
    draft,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    block_size: BlockSize = 16,
    policy=None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: int = 2048,
    refine: bool = False,
) -> Generator[GenerationResponse, None, None]:
    """Generate from ``prompt`` with DFlash speculative decoding, yielding per round.

    Greedy output equals the target's own greedy decoding; with ``temperature > 0``
    the output is distributed as the target's (speculative sampling).
    ``refine`` moves the block size round by round within a window (see
    ``refine_window``/``refine_width``); ``block_size`` in the responses stays the first pick.
    """
    params = SamplingParams(temperature, top_p, top_k, seed)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt) if prompt else []
    prompt = list(prompt)
    if not prompt:
        raise BlockPilotError("the prompt is empty; give at least one token of text")
    if max_tokens < 1:
        raise BlockPilotError(f"max_tokens must be >= 1, got {max_tokens}")
    context = target.max_context(model)
    if context is not None and len(prompt) >= context:
        raise BlockPilotError(
            f"the prompt has {len(prompt)} tokens but the target's context is {context}; shorten it"
        )
    cache = prompt_cache if prompt_cache is not None else make_cache(model, draft)
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    key = mx.random.key(seed)
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
        tic = time.perf_counter()
        reused = _reuse(cache, prompt)
        logits = _prefill(model, prompt[reused:], cache, draft.config.target_layer_ids, prefill_step_size)
        key, first_key = mx.random.split(key)
        first = greedy_tokens(logits) if params.greedy else sample(probabilities(logits, params), first_key)
        last = first.item()
        prefill_s = time.perf_counter() - tic

        tic = time.perf_counter()
        prompt_hidden = cache.pending
        width = choose_block_size(
            block_size, policy, lambda kind: policy_features(model, draft, logits, prompt_hidden, kind)
        )
        policy_s = time.perf_counter() - tic
        lo, hi = refine_window(width, block_size, policy) if refine else (width, width)
        round_width = width

        lengths: List[int] = []
        n = 1
        tic = time.perf_counter()

        def response(new_tokens, finish=None):
            for t in new_tokens:
                if t not in eos:
                    detokenizer.add_token(t)
            if finish:
                detokenizer.finalize()
            elapsed = time.perf_counter() - tic
            return GenerationResponse(
                text=detokenizer.last_segment,
                tokens=list(new_tokens),
                prompt_tokens=len(prompt),
                generation_tokens=n,
                block_size=width,
                acceptance_lengths=list(lengths),
                prefill_s=prefill_s,
                decode_tokens_per_s=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                policy_s=policy_s,
                finish_reason=finish,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
            )

        if last in eos:
            yield response([last], "stop")
            return
        if max_tokens == 1:
            yield response([last], "length")
            return
        yield response([last])

        while True:
            room = max_tokens - n
            if context is not None:
                room = min(room, context - len(cache.tokens))
            if room <= 0:
                yield response([], "length")
                return
            w = min(round_width, room)
            key, round_key = mx.random.split(key)
            drafted, accepted, nxt, hidden = _draft_round(model, draft, cache, last, w, params, round_key)
            out = mx.concatenate([drafted.astype(mx.int32), accepted[None].astype(mx.int32), nxt[None].astype(mx.int32)])
            values = out.tolist()  # the round's one host sync
            a = values[w - 1]
            new = values[: a] + [values[w]]
            new = new[: max_tokens - n]
            stop_at = next((i for i, t in enumerate(new) if t in eos), None)
            if stop_at is not None:
                new = new[: stop_at + 1]
            # Inputs of this verify that are now committed and stay in the cache: last + new[:-1].
            keep = len(new)
            for c in cache.target:
                c.trim(w - keep)
            cache.tokens.extend([last] + new[:-1])
            kept = hidden[:, :keep]
            cache.pending = kept if cache.pending is None else mx.concatenate([cache.pending, kept], axis=1)
            lengths.append(keep)
            round_width = refine_width(round_width, keep, w, lo, hi)
            n += keep
            last = new[-1]
            if stop_at is not None:
                yield response(new, "stop")
                return
            if n >= max_tokens:
                yield response(new, "length")
                return
            yield response(new)


def generate(model, draft, tokenizer, prompt, **kwargs) -> GenerationResponse:
    """Run ``stream_generate`` to the end; the last response with all text and tokens."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, draft, tokenizer, prompt, **kwargs):
        text.append(last.text)
        tokens.extend(last.tokens)
    last.text, last.tokens = "".join(text), tokens
    return last
