"""Sliding-window targets stay lossless: rejected draft tokens are rewound exactly even
after the window has wrapped, across block sizes, prompt lengths, turns and T > 0."""

import json

import mlx.core as mx
import pytest
from fixtures import write_draft, write_target
from mlx_lm import load
from test_decode import make_prompt, no_eos, reference
from test_sampling import RUNS, STEPS, VOCAB, assert_same_distribution, exact_distribution, word_tokenizer

from mlx_blockpilot.cache import make_cache
from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import load_draft

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


@pytest.fixture(scope="module", params=[6, 64], ids=["window6", "window64"])
def windowed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"swa{request.param}")
    cfg = write_target(root / "t", "llama", layer_types=LAYER_TYPES, sliding_window=request.param)
    model, tok = load(str(root / "t"))
    assert any(getattr(layer, "use_sliding", False) for layer in model.model.layers)
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    write_draft(root / "d", cfg, mask_id, target_layer_ids=(0, 2, 3))
    return model, tok, load_draft(root / "d"), request.param


@pytest.mark.parametrize("length", [3, 20, 90])
def test_greedy_equals_mlx_lm(windowed, length):
    model, tok, draft, window = windowed
    prompt = make_prompt(length, seed=length)
    ref = reference(model, prompt, max_tokens=40)
    for block in (1, 2, 4, 7, 16):
        r = generate(model, draft, no_eos(tok), prompt, block_size=block, max_tokens=40, prefill_step_size=32)
        assert r.tokens == ref, (window, length, block)


def test_multi_turn_cache_reuse(windowed):
    model, tok, draft, window = windowed
    t = no_eos(tok)
    cache = make_cache(model, draft)
    conversation = make_prompt(25, seed=3)
    for turn in range(3):
        r = generate(model, draft, t, conversation, block_size=5, max_tokens=20, prompt_cache=cache)
        assert r.tokens == reference(model, conversation, max_tokens=20), (window, turn)
        assert turn == 0 or r.reused_tokens > len(conversation) - 10
        conversation = conversation + r.tokens + make_prompt(7, seed=10 + turn)
    # a prompt that shares only a short prefix rewinds into the window's past
    other = conversation[:12] + make_prompt(9, seed=30)
    r = generate(model, draft, t, other, block_size=3, max_tokens=20, prompt_cache=cache)
    assert r.tokens == reference(model, other, max_tokens=20) and r.reused_tokens == 12


@pytest.mark.slow
def test_sampling_distribution_with_a_window_of_two(tmp_path):
    root = tmp_path
    cfg = write_target(root / "t", "llama", tokenizer=False, vocab_size=VOCAB, layer_types=LAYER_TYPES, sliding_window=2)
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(json.loads((root / "t/config.json").read_text())))
    model.load_weights(str(root / "t/model.safetensors"))
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 0.25
    mx.eval(model.parameters())
    # a random drafter whose proposals are accepted about half the time (the test must exercise acceptance)
    write_draft(root / "d", cfg, mask_token_id=VOCAB - 1, seed=2, target_layer_ids=(1, 3))
    draft = load_draft(root / "d")
    prompt = [1, 4, 2, 6, 3]
    exact = exact_distribution(model, prompt, 1.0, 1.0, 0)
    counts, accepted_any = {}, 0
    tok = word_tokenizer()
    for seed in range(RUNS):
        r = generate(model, draft, tok, prompt, block_size=3, max_tokens=STEPS, temperature=1.0, seed=seed)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        accepted_any += any(a > 1 for a in r.acceptance_lengths)
    assert accepted_any > 0.05 * RUNS
    assert_same_distribution(counts, exact)
