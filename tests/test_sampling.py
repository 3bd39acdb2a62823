"""Speculative sampling keeps the target's output distribution (T > 0, top-p, top-k)."""

import json
import math
from itertools import product

import mlx.core as mx
import numpy as np
import pytest
from fixtures import write_draft, write_target
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import load_draft

VOCAB = 8
STEPS = 3
RUNS = 1500


def chi2_pvalue(stat, df):
    """Upper tail of chi-square via the Wilson-Hilferty normal approximation."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def filtered_probs_numpy(logits, temp, top_p, top_k):
    """Independent numpy version of mlx-lm's sampler: top-p, then top-k, then softmax(x / temp)."""
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    keep = np.ones_like(logp, dtype=bool)
    if top_p < 1:
        order = np.argsort(-logp)
        probs = np.exp(logp[order])
        before = np.cumsum(probs) - probs
        keep_sorted = before < top_p
        keep = np.zeros_like(keep)
        keep[order[keep_sorted]] = True
    if 0 < top_k < len(logp):
        kth = np.sort(np.where(keep, logp, -np.inf))[::-1][top_k - 1]
        keep &= logp >= kth
    x = np.where(keep, logp / temp, -np.inf)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_vocab")
    # Small embeddings keep the distributions spread over several tokens.
    cfg = write_target(root / "t", "qwen3", tokenizer=False, vocab_size=VOCAB)
    write_draft(root / "d", cfg, mask_token_id=VOCAB - 1, seed=5)
    from mlx_lm.models import qwen3

    import json

    model = qwen3.Model(qwen3.ModelArgs.from_dict(json.loads((root / "t/config.json").read_text())))
    model.load_weights(str(root / "t/model.safetensors"))
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 0.25
    mx.eval(model.parameters())
    return model, load_draft(root / "d")


def word_tokenizer():
    """A word-level tokenizer over VOCAB words, without EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok))


def exact_distribution(model, prompt, temp, top_p, top_k):
    """P(first STEPS tokens) by enumerating every sequence with the target alone."""
    dist = {}
    for seq in product(range(VOCAB), repeat=STEPS - 1):
        logits = model(mx.array([prompt + list(seq)]))[0].astype(mx.float32)
        rows = np.array(logits[len(prompt) - 1 :])
        probs = [filtered_probs_numpy(r, temp, top_p, top_k) for r in rows]
        prefix_p = np.prod([probs[i][seq[i]] for i in range(STEPS - 1)])
        for last in range(VOCAB):
            dist[seq + (last,)] = prefix_p * probs[STEPS - 1][last]
    return dist


@pytest.mark.parametrize(
    "block, temp, top_p, top_k",
    [(1, 0.7, 0.9, 0), (2, 1.0, 1.0, 0), (4, 1.0, 1.0, 0), (3, 0.7, 0.9, 0), (16, 1.3, 1.0, 4)],
)
def test_output_distribution_equals_target(small_vocab, block, temp, top_p, top_k):
    model, draft = small_vocab
    tok = word_tokenizer()
    prompt = [1, 4, 2]
    exact = exact_distribution(model, prompt, temp, top_p, top_k)
    counts = {}
    accepted_any = 0
    for seed in range(RUNS):
        r = generate(model, draft, tok, prompt, block_size=block, max_tokens=STEPS, temperature=temp, top_p=top_p, top_k=top_k, seed=seed)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        accepted_any += any(a > 1 for a in r.acceptance_lengths)
    if block > 1:  # (block 1 is plain decoding: rounds built one ahead, sampled from the target alone)
        assert accepted_any > 0.05 * RUNS, "the test should exercise accepted draft tokens"
    assert_same_distribution(counts, exact)


def assert_same_distribution(counts, exact):
    """Sampled sequence ``counts`` against ``exact`` probabilities: nothing impossible, and a
    chi-square over outcomes (rare ones, expected count < 5, pooled) that does not reject."""
    runs = sum(counts.values())
    assert all(exact.get(s, 0) > 0 for s in counts), "sampled a sequence with zero target probability"
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for seq, p in exact.items():
        e = p * runs
        o = counts.get(seq, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert df >= 5
    assert chi2_pvalue(stat, df) > 1e-4, f"chi2={stat:.1f} df={df}"


def test_reduced_draft_vocabulary_keeps_the_distribution(small_vocab, tmp_path):
    """A drafter that can only propose 5 of the 8 tokens: still the target's distribution."""
    model, _ = small_vocab
    cfg = json.loads(json.dumps(dict(vocab_size=VOCAB, hidden_size=model.args.hidden_size, rope_theta=model.args.rope_theta,
                                     max_position_embeddings=model.args.max_position_embeddings,
                                     num_hidden_layers=model.args.num_hidden_layers)))
    write_draft(tmp_path / "d", cfg, mask_token_id=VOCAB - 1, seed=5, draft_ids=[0, 2, 3, 5, 7])
    draft = load_draft(tmp_path / "d")
    tok = word_tokenizer()
    prompt = [1, 4, 2]
    exact = exact_distribution(model, prompt, 1.0, 1.0, 0)
    counts, accepted_any = {}, 0
    for seed in range(RUNS):
        r = generate(model, draft, tok, prompt, block_size=4, max_tokens=STEPS, temperature=1.0, seed=seed)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        accepted_any += any(a > 1 for a in r.acceptance_lengths)
    assert accepted_any > 0.05 * RUNS
    assert any(t in (1, 4, 6) for s in counts for t in s), "tokens outside the draft vocabulary still come out"
    assert_same_distribution(counts, exact)


def test_seed_reproducible(small_vocab):
    model, draft = small_vocab
    tok = word_tokenizer()
    runs = [generate(model, draft, tok, [1, 2], block_size=4, max_tokens=12, temperature=1.0, seed=7).tokens for _ in range(2)]
    assert runs[0] == runs[1]
    other = [generate(model, draft, tok, [1, 2], block_size=4, max_tokens=12, temperature=1.0, seed=s).tokens for s in range(8, 14)]
    assert any(o != runs[0] for o in other)


def test_each_drafts_expected_acceptance_is_what_its_coin_averages_to():
    """``accept_sampled``'s ``expected[i] = sum(min(p_i, q_i))`` is the probability that draft
    ``i``, sampled from ``q_i``, is kept when the drafts before it were (what the per-round
    controller counts instead of the kept/rejected outcome)."""
    from mlx_blockpilot.options import GenerationOptions
    from mlx_blockpilot.sampling import accept_sampled, probabilities, sample

    rng = np.random.default_rng(1)
    opts = GenerationOptions(temperature=0.7, top_p=0.9)
    target_logits = mx.array(rng.standard_normal((3, VOCAB)).astype(np.float32) * 2)
    noise = mx.array(rng.standard_normal((2, VOCAB)).astype(np.float32) * 1.5)
    q = mx.softmax(target_logits[:2] / 0.7 + noise, axis=-1)  # a drafter near the target
    want = np.minimum(np.array(probabilities(target_logits, opts))[:2], np.array(q)).sum(axis=-1)
    assert 0.1 < want.min() and want.max() < 0.9  # neither always kept nor never
    reached, kept = np.zeros(2), np.zeros(2)
    for seed in range(2000):
        draft_key, key = mx.random.split(mx.random.key(seed))
        accepted, _, expected = accept_sampled(sample(q, draft_key), q, target_logits, opts, key)
        np.testing.assert_allclose(np.array(expected), want, rtol=1e-5)
        a = accepted.item()
        reached += [1, a >= 1]
        kept += [a >= 1, a >= 2]
    sd = np.sqrt(want * (1 - want) / reached)
    assert np.all(np.abs(kept / reached - want) < 4 * sd), (kept / reached, want)


def test_probabilities_match_numpy_reference():
    from mlx_blockpilot.options import GenerationOptions
    from mlx_blockpilot.sampling import probabilities

    rng = np.random.default_rng(0)
    for temp, top_p, top_k in [(1.0, 1.0, 0), (0.5, 0.8, 0), (2.0, 1.0, 3), (1.0, 0.6, 5)]:
        logits = rng.standard_normal(50).astype(np.float32) * 3
        ours = np.array(probabilities(mx.array(logits), GenerationOptions(temperature=temp, top_p=top_p, top_k=top_k)))
        np.testing.assert_allclose(ours, filtered_probs_numpy(logits.astype(np.float64), temp, top_p, top_k), atol=1e-5)


@pytest.mark.parametrize("sampler", ["sample_target", "sample_draft"])
def test_the_samplers_draw_from_the_probabilities(sampler):
    """``sample_target`` (a plain round's: categorical over the scores, no softmax) and
    ``sample_draft`` (a drafted round's: the draws and their probabilities from one pass) draw
    each token with its probability under ``probabilities``: the filters and the temperature
    included."""
    from mlx_blockpilot import sampling
    from mlx_blockpilot.options import GenerationOptions

    rng = np.random.default_rng(2)
    n = 6000
    for temp, top_p, top_k in [(0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 1.0, 3)]:
        logits = rng.standard_normal(VOCAB).astype(np.float32) * 2
        want = filtered_probs_numpy(logits.astype(np.float64), temp, top_p, top_k)
        opts = GenerationOptions(temperature=temp, top_p=top_p, top_k=top_k)
        batch = mx.broadcast_to(mx.array(logits), (n, VOCAB))
        draws = getattr(sampling, sampler)(batch, opts, mx.random.key(int(temp * 10)))
        if sampler == "sample_draft":
            draws, probs = draws
            np.testing.assert_allclose(np.array(probs[0]), want, atol=1e-6)
        counts = np.bincount(np.array(draws), minlength=VOCAB)
        assert counts[want == 0].sum() == 0, "sampled a filtered token"
        live = want > 0
        stat = (((counts[live] - n * want[live]) ** 2) / (n * want[live])).sum()
        assert chi2_pvalue(stat, live.sum() - 1) > 1e-4, (temp, top_p, top_k, counts, want)


def test_acceptance_over_a_reduced_vocabulary_is_acceptance_over_the_full_one():
    """A drafter's logits over its own vocabulary (``draft_ids``) give what the same logits
    spread over the target's vocabulary (``-inf`` elsewhere) give: the same probabilities, the
    same kept drafts, the same next token (tokens outside the drafter's vocabulary included)
    and the same expected acceptance, with the same keys."""
    from mlx_blockpilot.draft import target_tokens
    from mlx_blockpilot.options import GenerationOptions
    from mlx_blockpilot.sampling import accept_sampled, probabilities, sample_draft

    rng = np.random.default_rng(3)
    V, n = 40, 3
    ids = mx.array(np.sort(rng.choice(V, 25, replace=False)).astype(np.int32))
    outside = 0
    for temp, top_p, top_k in [(0.7, 1.0, 0), (1.0, 0.9, 0), (1.2, 1.0, 10)]:
        opts = GenerationOptions(temperature=temp, top_p=top_p, top_k=top_k)
        target_logits = mx.array(rng.standard_normal((n + 1, V)).astype(np.float32) * 2)
        reduced = target_logits[:n, ids] + mx.array(rng.standard_normal((n, 25)).astype(np.float32))
        full = mx.full((n, V), -mx.inf)
        full[:, ids] = reduced
        q_full = probabilities(full, opts)
        for seed in range(150):
            draft_key, key = mx.random.split(mx.random.key(seed))
            choices, q = sample_draft(reduced, opts, draft_key)
            np.testing.assert_allclose(np.array(q_full[:, ids]), np.array(q), atol=1e-6)
            ours = accept_sampled(choices, q, target_logits, opts, key, ids)
            theirs = accept_sampled(target_tokens(ids, choices), q_full, target_logits, opts, key)
            assert ours[0].item() == theirs[0].item() and ours[1].item() == theirs[1].item()
            np.testing.assert_allclose(np.array(ours[2]), np.array(theirs[2]), atol=1e-6)
            outside += ours[1].item() not in ids.tolist()
    assert outside > 20  # the next token came from outside the drafter's vocabulary, often
