"""Lossless greedy decoding: exact token equality with mlx-lm's greedy decoding."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_blockpilot.bench.drafters import ScriptedDraft
from mlx_blockpilot.decode import generate, make_cache, stream_generate
from mlx_blockpilot.errors import BlockPilotError

MAX = 40


def reference(model, prompt, max_tokens=MAX, eos=()):
    """mlx-lm greedy tokens, cut after the first EOS."""
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(tok)
        if tok in eos:
            break
    return out


def no_eos(tokenizer, eos=()):
    tw = TokenizerWrapper(tokenizer._tokenizer)
    tw.eos_token_ids = eos
    return tw


def make_prompt(length, seed=0, vocab=300):
    return np.random.default_rng(seed).integers(5, vocab, size=length).tolist()


@pytest.mark.parametrize("length", [1, 3, 37, 300])
def test_greedy_equals_mlx_lm_all_block_sizes(tiny, length):
    prompt = make_prompt(length, seed=length)
    ref = reference(tiny.model, prompt)
    tok = no_eos(tiny.tokenizer)
    for block in range(1, 21):
        r = generate(tiny.model, tiny.draft, tok, prompt, block_size=block, max_tokens=MAX, prefill_step_size=64)
        assert r.tokens == ref, f"block {block}, prompt length {length}"
        assert r.finish_reason == "length"
        assert r.generation_tokens == MAX
        assert sum(r.acceptance_lengths) == MAX - 1
        assert all(1 <= a <= block for a in r.acceptance_lengths)
        # each round's width: the block, or what max_tokens leaves room for (the prefill gave one token)
        room = [MAX - 1 - sum(r.acceptance_lengths[:i]) for i in range(len(r.acceptance_lengths))]
        assert r.round_widths == [min(block, left) for left in room]


@pytest.mark.parametrize("block", [2, 5, 16])
def test_full_acceptance_with_true_continuation(tiny, block):
    prompt = make_prompt(11, seed=3)
    ref = reference(tiny.model, prompt)
    draft = ScriptedDraft(tiny.draft.config, prompt + ref, tiny.cfg["vocab_size"])
    r = generate(tiny.model, draft, no_eos(tiny.tokenizer), prompt, block_size=block, max_tokens=MAX)
    assert r.tokens == ref
    # Every round but the last (cut by max_tokens) accepts the whole block.
    assert all(a == block for a in r.acceptance_lengths[:-1])
    assert r.acceptance_lengths[-1] == (MAX - 1) - block * (len(r.acceptance_lengths) - 1)


@pytest.mark.parametrize("block", [2, 8])
def test_always_wrong_drafter_accepts_nothing(tiny, block):
    prompt = make_prompt(9, seed=4)
    ref = reference(tiny.model, prompt)
    draft = ScriptedDraft(tiny.draft.config, prompt + ref, tiny.cfg["vocab_size"], wrong=True)
    r = generate(tiny.model, draft, no_eos(tiny.tokenizer), prompt, block_size=block, max_tokens=MAX)
    assert r.tokens == ref
    assert r.acceptance_lengths == [1] * (MAX - 1)


@pytest.mark.parametrize("scripted", [True, False])
def test_eos_inside_block(tiny, scripted):
    prompt = make_prompt(7, seed=5)
    ref = reference(tiny.model, prompt, max_tokens=60)
    for k in range(2, 40, 3):
        eos = ref[k]
        if eos in ref[:k]:
            continue
        expected = ref[: k + 1]
        draft = ScriptedDraft(tiny.draft.config, prompt + ref, tiny.cfg["vocab_size"]) if scripted else tiny.draft
        for block in (4, 16):
            r = generate(tiny.model, draft, no_eos(tiny.tokenizer, [eos]), prompt, block_size=block, max_tokens=60)
            assert r.tokens == expected, (k, block)
            assert r.finish_reason == "stop"
            assert reference(tiny.model, prompt, 60, eos={eos}) == expected


def test_eos_as_first_token(tiny):
    prompt = make_prompt(6, seed=6)
    first = reference(tiny.model, prompt, max_tokens=1)[0]
    r = generate(tiny.model, tiny.draft, no_eos(tiny.tokenizer, [first]), prompt, block_size=4)
    assert r.tokens == [first] and r.finish_reason == "stop" and r.text == ""


@pytest.mark.parametrize("max_tokens", [1, 2, 13, 17])
def test_max_tokens_cuts_a_block(tiny, max_tokens):
    prompt = make_prompt(8, seed=7)
    ref = reference(tiny.model, prompt)
    draft = ScriptedDraft(tiny.draft.config, prompt + ref, tiny.cfg["vocab_size"])
    r = generate(tiny.model, draft, no_eos(tiny.tokenizer), prompt, block_size=8, max_tokens=max_tokens)
    assert r.tokens == ref[:max_tokens]
    assert r.finish_reason == "length"


def test_stream_text_matches_tokens(tiny):
    prompt = tiny.tokenizer.encode("the quick brown fox")
    tok = no_eos(tiny.tokenizer)
    chunks = list(stream_generate(tiny.model, tiny.draft, tok, prompt, block_size=6, max_tokens=30))
    tokens = [t for c in chunks for t in c.tokens]
    assert "".join(c.text for c in chunks) == tiny.tokenizer.decode(tokens)
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].block_size == 6 and chunks[-1].prefill_s > 0


def test_context_limit(tmp_path):
    from fixtures import write_draft, write_target
    from mlx_lm import load

    from mlx_blockpilot.draft import load_draft

    cfg = write_target(tmp_path / "t", "qwen3", max_position_embeddings=48)
    model, tok = load(str(tmp_path / "t"))
    write_draft(tmp_path / "d", cfg, mask_token_id=3)
    draft = load_draft(tmp_path / "d")
    prompt = make_prompt(30, seed=8)
    ref = reference(model, prompt, max_tokens=19)
    for block in (1, 4, 16):
        r = generate(model, draft, no_eos(tok), prompt, block_size=block, max_tokens=100)
        # The target cache may hold 48 positions: prompt + all generated tokens but the last.
        assert r.tokens == ref and r.finish_reason == "length"
    with pytest.raises(BlockPilotError, match="context"):
        generate(model, draft, tok, make_prompt(48), block_size=4)


def test_prompt_cache_reuse_is_lossless(tiny):
    tok = no_eos(tiny.tokenizer)
    cache = make_cache(tiny.model, tiny.draft)
    first = make_prompt(20, seed=9)
    r1 = generate(tiny.model, tiny.draft, tok, first, block_size=5, max_tokens=15, prompt_cache=cache)
    # Next turn: the whole conversation so far plus new tokens; only the new part is prefilled.
    second = first + r1.tokens + make_prompt(6, seed=10)
    r2 = generate(tiny.model, tiny.draft, tok, second, block_size=5, max_tokens=15, prompt_cache=cache)
    assert r2.tokens == reference(tiny.model, second, max_tokens=15)
    assert len(cache.tokens) == len(second) + 14
    # A prompt that diverges early trims the caches back to the shared prefix.
    third = first[:5] + make_prompt(9, seed=11)
    r3 = generate(tiny.model, tiny.draft, tok, third, block_size=3, max_tokens=15, prompt_cache=cache)
    assert r3.tokens == reference(tiny.model, third, max_tokens=15)


def cache_is_exact(cache):
    """The target caches hold exactly the committed tokens, and the drafter has them all seen or pending."""
    pending = 0 if cache.pending is None else cache.pending.shape[1]
    return all(c.offset == len(cache.tokens) for c in cache.target) and cache.drafted + pending == len(cache.tokens)


def test_plain_rounds_built_ahead_leave_the_cache_exact(tiny):
    """Plain rounds (width 1) build the next round before the host waits; one built but not
    needed (EOS, max_tokens, the caller closing the generator) must leave no trace."""
    from mlx_blockpilot.decode import generate_step
    from mlx_blockpilot.options import GenerationOptions

    prompt = make_prompt(12, seed=21)
    ref = reference(tiny.model, prompt, max_tokens=30)
    for k in (0, 1, 7, 29):  # EOS as the first token, early, mid-answer, the last one allowed
        if ref[k] in ref[:k]:
            continue
        cache = make_cache(tiny.model, tiny.draft)
        r = generate(tiny.model, tiny.draft, no_eos(tiny.tokenizer, [ref[k]]), prompt, block_size=1, refine=False,
                     max_tokens=30, prompt_cache=cache)
        assert r.tokens == ref[: k + 1] and r.finish_reason == "stop"
        assert cache_is_exact(cache) and cache.tokens == prompt + ref[:k]
    for max_tokens in (1, 2, 13):
        cache = make_cache(tiny.model, tiny.draft)
        r = generate(tiny.model, tiny.draft, no_eos(tiny.tokenizer), prompt, block_size=1, refine=False,
                     max_tokens=max_tokens, prompt_cache=cache)
        assert r.tokens == ref[:max_tokens] and cache_is_exact(cache) and cache.tokens == prompt + ref[: max_tokens - 1]
    # closed between steps, then the conversation goes on (drafting again): still exact
    cache = make_cache(tiny.model, tiny.draft)
    steps = generate_step(tiny.model, tiny.draft, prompt, GenerationOptions(max_tokens=30, block_size=1, refine=False),
                          prompt_cache=cache)
    got = [t for _, s in zip(range(5), steps) for t in s.tokens]
    steps.close()
    assert got == ref[:5] and cache_is_exact(cache) and cache.tokens == prompt + ref[:4]
    second = prompt + got + make_prompt(5, seed=22)
    r = generate(tiny.model, tiny.draft, no_eos(tiny.tokenizer), second, block_size=4, max_tokens=20, prompt_cache=cache)
    assert r.tokens == reference(tiny.model, second, max_tokens=20) and r.reused_tokens == len(prompt) + 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block size"),
        (dict(block_size="auto"), "policy"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top-p"),
        (dict(temperature=1.0, top_p=1.5), "top-p"),
        (dict(temperature=1.0, top_k=-1), "top-k"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_arguments(qwen3, kwargs, match):
    with pytest.raises(BlockPilotError, match=match):
        generate(qwen3.model, qwen3.draft, qwen3.tokenizer, [5, 6, 7], **kwargs)


def test_empty_prompt(qwen3):
    with pytest.raises(BlockPilotError, match="empty"):
        generate(qwen3.model, qwen3.draft, qwen3.tokenizer, "")


@pytest.mark.parametrize("kind", ["logits", "hidden"])
def test_policy_picks_block_size_from_prefill(tiny, kind):
    from mlx_blockpilot.decode import make_cache as new_cache, policy_features
    from mlx_blockpilot.policy import BlockPolicy, PolicyConfig, choose_block_size
    from mlx_blockpilot import target

    size = tiny.cfg["vocab_size"] if kind == "logits" else tiny.cfg["hidden_size"]
    mx.random.seed(0)
    policy = BlockPolicy(PolicyConfig(input_kind=kind, input_size=size, hidden_size=16, block_sizes=[2, 3, 5, 9]))
    tok = no_eos(tiny.tokenizer)
    for seed in range(6):
        prompt = make_prompt(10 + seed, seed=20 + seed)
        r = generate(tiny.model, tiny.draft, tok, prompt, block_size="auto", policy=policy, max_tokens=20)
        assert r.tokens == reference(tiny.model, prompt, max_tokens=20)
        # The pick is the policy's choice on features of one separate prefill of the prompt.
        cache = new_cache(tiny.model, tiny.draft)
        _, hidden = target.forward(tiny.model, mx.array([prompt]), cache.target, tiny.draft.config.target_layer_ids)
        logits = target.forward(tiny.model, mx.array([prompt]), new_cache(tiny.model, tiny.draft).target)[0][0, -1]
        feats = policy_features(tiny.model, tiny.draft, logits, hidden, kind)
        assert r.block_size == choose_block_size(policy, feats)
        assert all(a <= r.block_size for a in r.acceptance_lengths)
    assert r.policy_s > 0


def test_reduced_draft_vocabulary_is_lossless(qwen3, tmp_path):
    """A drafter whose head covers a third of the vocabulary: same tokens as mlx-lm, and it
    only ever proposes tokens of its vocabulary (the rest come from the target)."""
    from fixtures import write_draft

    from mlx_blockpilot import target
    from mlx_blockpilot.draft import load_draft, target_tokens

    ids = list(range(0, qwen3.cfg["vocab_size"], 3))
    write_draft(tmp_path / "d", qwen3.cfg, qwen3.mask_id, draft_ids=ids)
    draft = load_draft(tmp_path / "d")
    assert draft.config.draft_vocab_size == len(ids) and draft.draft_ids().tolist() == ids
    tok = no_eos(qwen3.tokenizer)
    cache = make_cache(qwen3.model, draft)
    cache.commit([5, 6, 7], None, 3)
    mx.eval([c.state for c in cache.target])
    logits = draft.propose(qwen3.model, mx.array([[7] + [qwen3.mask_id] * 4]), mx.zeros((1, 3, 2 * qwen3.cfg["hidden_size"])), cache.draft)
    assert logits.shape == (4, len(ids))  # over the drafter's vocabulary: the head's rows of `ids`
    full = target.lm_head(qwen3.model, draft(draft.embed(qwen3.model, mx.array([[7] + [qwen3.mask_id] * 4])),
                                              mx.zeros((1, 3, 2 * qwen3.cfg["hidden_size"])))[0, 1:])
    np.testing.assert_allclose(np.array(logits), np.array(full)[:, ids], rtol=1e-5, atol=1e-5)
    choices = mx.argmax(logits, -1)
    assert target_tokens(draft.draft_ids(), choices).tolist() == [ids[i] for i in choices.tolist()]
    for length in (1, 37):
        prompt = make_prompt(length, seed=40 + length)
        ref = reference(qwen3.model, prompt)
        for block in (2, 4, 7):
            assert generate(qwen3.model, draft, tok, prompt, block_size=block, max_tokens=MAX).tokens == ref, (length, block)
    # The ids and the head's rows are built once and kept; a new table is a new vocabulary.
    assert draft.draft_ids() is draft.draft_ids()
    other = [i + 1 for i in ids]
    draft.load_weights([("d2t", mx.array(np.array(other) - np.arange(len(ids)), dtype=mx.int64))], strict=False)
    assert draft.draft_ids().tolist() == other
    h = draft(draft.embed(qwen3.model, mx.array([[7] + [qwen3.mask_id] * 4])), mx.zeros((1, 3, 2 * qwen3.cfg["hidden_size"])))[0, 1:]
    np.testing.assert_allclose(np.array(draft.head(qwen3.model, h)), np.array(target.lm_head(qwen3.model, h))[:, other],
                               rtol=1e-5, atol=1e-5)


def test_bad_draft_vocabulary_tables_are_refused(qwen3, tmp_path):
    import json

    from fixtures import write_draft

    from mlx_blockpilot.draft import load_draft

    write_draft(tmp_path / "big", qwen3.cfg, qwen3.mask_id, draft_ids=range(3))
    cfg = json.loads((tmp_path / "big" / "config.json").read_text())
    (tmp_path / "big" / "config.json").write_text(json.dumps(dict(cfg, draft_vocab_size=10**6)))
    with pytest.raises(BlockPilotError, match="draft_vocab_size"):
        load_draft(tmp_path / "big")
    write_draft(tmp_path / "order", qwen3.cfg, qwen3.mask_id, draft_ids=[4, 9, 12])
    from safetensors.numpy import load_file, save_file

    w = load_file(str(tmp_path / "order" / "model.safetensors"))
    w["d2t"] = np.array([4, 0, -1], np.int64)  # target ids 4, 1, 1: not increasing
    save_file(w, str(tmp_path / "order" / "model.safetensors"))
    with pytest.raises(BlockPilotError, match="d2t"):
        load_draft(tmp_path / "order")
    assert json.loads((tmp_path / "order" / "config.json").read_text())["draft_vocab_size"] == 3
