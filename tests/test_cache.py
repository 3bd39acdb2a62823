"""The prompt cache's rules: commit, trim_to and reuse keep target, drafter and tokens in step."""

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache
from test_decode import make_prompt, no_eos, reference

from mlx_blockpilot.cache import make_cache
from mlx_blockpilot.decode import generate


def consistent(cache):
    pending = 0 if cache.pending is None else cache.pending.shape[1]
    return cache.target[0].offset == len(cache.tokens) == cache.drafted + pending


def test_commit_trim_and_reuse_keep_the_caches_in_step(tiny):
    tok = no_eos(tiny.tokenizer)
    cache = make_cache(tiny.model, tiny.draft)
    prompt = make_prompt(30, seed=1)
    r = generate(tiny.model, tiny.draft, tok, prompt, block_size=4, max_tokens=12, prompt_cache=cache)
    # everything but the last generated token (never fed back) is in the cache
    assert cache.tokens == prompt + r.tokens[:-1] and consistent(cache)
    assert cache.trim_to(100) == len(cache.tokens)  # asking for more keeps all
    for length in (35, 31, 10):  # into the generated part, at the drafter's edge, into the prompt
        assert cache.trim_to(length) == length
        assert cache.tokens == (prompt + r.tokens)[:length] and consistent(cache)
    assert cache.reuse(prompt[:10] + [7, 8]) == 10 and consistent(cache)
    assert cache.reuse(prompt[:10]) == 9  # the prompt's last token is always prefilled again
    # decoding from the rewound cache is still exact
    r2 = generate(tiny.model, tiny.draft, tok, prompt, block_size=3, max_tokens=12, prompt_cache=cache)
    assert r2.tokens == reference(tiny.model, prompt, max_tokens=12) and r2.reused_tokens == 9


def test_a_cache_that_cannot_be_trimmed_is_kept_or_starts_over(qwen3):
    cache = make_cache(qwen3.model, qwen3.draft)
    cache.target = [RotatingKVCache(max_size=8) for _ in cache.target]
    k = mx.zeros((1, qwen3.cfg["num_key_value_heads"], 12, qwen3.cfg["head_dim"]))
    for c in cache.target:
        c.update_and_fetch(k, k)  # 12 positions into a window of 8: the past is gone
    cache.tokens = list(range(12))
    cache.pending = mx.zeros((1, 12, 4))
    assert not cache.target[0].is_trimmable()
    # continuing the conversation needs no rewind: everything is kept
    assert cache.reuse(list(range(12)) + [3]) == 12 and len(cache.tokens) == 12
    # a prompt that diverges earlier would need one: the caches start over
    assert cache.reuse(list(range(5)) + [99, 98]) == 0
    assert cache.tokens == [] and cache.pending is None and cache.drafted == 0
    assert all(c.offset == 0 for c in cache.target)


def test_unread_features_are_joined_once_when_read(tiny):
    tok = no_eos(tiny.tokenizer)
    cache = make_cache(tiny.model, tiny.draft)
    prompt = make_prompt(20, seed=3)
    generate(tiny.model, tiny.draft, tok, prompt, block_size=1, max_tokens=6, prompt_cache=cache)
    # plain rounds: the prefill's features, then one piece per round, none joined yet
    parts = list(cache.pending_parts)
    assert len(parts) == 1 + 5 and consistent(cache)
    joined = cache.pending
    assert len(cache.pending_parts) == 1 and joined.shape[1] == len(cache.tokens) - cache.drafted
    assert mx.array_equal(joined, mx.concatenate(parts, axis=1))
    length = len(cache.tokens) - 3  # a rewind into the unread features
    assert cache.trim_to(length) == length and consistent(cache)
    assert mx.array_equal(cache.take_pending(), mx.concatenate(parts, axis=1)[:, : length - cache.drafted])
    assert cache.pending is None and cache.pending_parts == []
