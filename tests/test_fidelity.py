"""Faithfulness to the official z-lab MLX backend (``dflash.model_mlx``, a test-only oracle)."""

import mlx.core as mx
import numpy as np
import pytest
from fixtures import write_draft
from mlx_lm import load
from test_decode import make_prompt, no_eos, reference

from mlx_blockpilot import target
from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import load_draft

official = pytest.importorskip("dflash.model_mlx", reason="pip install --no-deps dflash==0.1.0")


def official_draft(path, monkeypatch):
    monkeypatch.setattr(official, "snapshot_download", lambda repo, **kw: str(repo))
    return official.load_draft(str(path))


def context_hidden(model, tokens, ids):
    cache = official.make_prompt_cache(model)
    _, hidden = target.forward(model, mx.array([tokens]), cache, ids)
    return hidden


@pytest.mark.parametrize(
    "draft_kwargs",
    [
        dict(),
        dict(num_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=6),
        dict(num_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=40, is_causal=False),
    ],
    ids=["full", "sliding6", "sliding40-noncausal"],
)
def test_draft_logits_match_official(qwen3, tmp_path, monkeypatch, draft_kwargs):
    write_draft(tmp_path / "d", qwen3.cfg, qwen3.mask_id, target_layer_ids=(0, 2, 3), **draft_kwargs)
    ours = load_draft(tmp_path / "d")
    theirs = official_draft(tmp_path / "d", monkeypatch).bind(qwen3.model)
    ids = ours.config.target_layer_ids
    seq = make_prompt(60, seed=1)
    our_cache, their_cache = ours.make_cache(), theirs.make_cache()
    # Three rounds: a long first context, then short committed chunks (cache carried over).
    for start, end, width in [(0, 30, 16), (30, 34, 8), (34, 41, 4)]:
        hidden = context_hidden(qwen3.model, seq[:end], ids)[:, start:end]
        block = mx.array([[seq[end]] + [qwen3.mask_id] * (width - 1)])
        a = ours.propose(qwen3.model, block, hidden, our_cache)
        b = theirs(block, hidden, their_cache, logits_start=1)[0]
        diff = mx.abs(a - b).max().item()
        assert a.shape == b.shape and diff < 1e-4, f"round ending at {end}: max abs diff {diff}"


@pytest.mark.parametrize("block", [2, 8, 16])
def test_generated_tokens_match_official(qwen3, monkeypatch, block):
    prompt = make_prompt(23, seed=2)
    tok = no_eos(qwen3.tokenizer)
    ours = generate(qwen3.model, qwen3.draft, tok, prompt, block_size=block, max_tokens=48).tokens
    # The official loop patches the model instance it is given: hand it a fresh copy.
    their_model, _ = load(str(qwen3.target_dir))
    theirs_draft = official_draft(qwen3.draft_dir, monkeypatch)
    theirs = []
    for r in official.stream_generate(their_model, theirs_draft, tok, mx.array(prompt), block_size=block, max_tokens=48):
        theirs.extend(r.tokens)
    assert ours == theirs == reference(qwen3.model, prompt, max_tokens=48)


def test_full_acceptance_matches_official_acceptance(qwen3, monkeypatch):
    """Same drafter, same target: the two loops accept the same number of tokens per round."""
    prompt = make_prompt(15, seed=4)
    tok = no_eos(qwen3.tokenizer)
    ours = generate(qwen3.model, qwen3.draft, tok, prompt, block_size=4, max_tokens=40)
    their_model, _ = load(str(qwen3.target_dir))
    accepted = [r.accepted for r in official.stream_generate(
        their_model, official_draft(qwen3.draft_dir, monkeypatch), tok, mx.array(prompt), block_size=4, max_tokens=40
    ) if r.accepted]
    assert ours.acceptance_lengths == accepted
    assert np.isclose(ours.mean_acceptance, np.mean(accepted))
