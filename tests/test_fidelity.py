"""Faithfulness to the official z-lab MLX backend (``dflash.model_mlx``, a test-only oracle)."""

import json
import shutil

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


def with_fields(path, fields):
    """Add ``fields`` to the drafter's ``dflash_config``."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["dflash_config"].update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


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
        dict(dflash=dict(input_embedding_scale=2.5, output_multiplier=0.7, final_logit_softcapping=3.0)),
    ],
    ids=["full", "sliding6", "sliding40-noncausal", "scales-softcap"],
)
def test_draft_logits_match_official(qwen3, tmp_path, monkeypatch, draft_kwargs):
    draft_kwargs = dict(draft_kwargs)
    extra = draft_kwargs.pop("dflash", {})
    write_draft(tmp_path / "d", qwen3.cfg, qwen3.mask_id, target_layer_ids=(0, 2, 3), **draft_kwargs)
    with_fields(tmp_path / "d", extra)
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


def test_drafter_config_fields_follow_their_definitions(qwen3, tmp_path):
    """input_embedding_scale scales the block embeddings; output_multiplier then
    final_logit_softcapping act on the logits: cap * tanh(m * logits / cap)."""
    write_draft(tmp_path / "d", qwen3.cfg, qwen3.mask_id, target_layer_ids=(0, 2, 3))
    seq = make_prompt(30, seed=3)
    block = mx.array([[seq[20]] + [qwen3.mask_id] * 5])

    def logits(fields, embed_by=1.0):
        d = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "d", d)
        with_fields(d, fields)
        draft = load_draft(d)
        hidden = context_hidden(qwen3.model, seq[:20], draft.config.target_layer_ids)
        if embed_by == 1.0:
            return np.array(draft.propose(qwen3.model, block, hidden, draft.make_cache()))
        h = draft(target.embed(qwen3.model, block) * embed_by, hidden, draft.make_cache())
        return np.array(target.lm_head(qwen3.model, h[0, 1:]))

    base = logits({})
    np.testing.assert_allclose(logits({"output_multiplier": 0.7}), 0.7 * base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits({"output_multiplier": 0.7, "final_logit_softcapping": 3.0}),
                               3.0 * np.tanh(0.7 * base / 3.0), rtol=1e-5, atol=1e-5)
    scaled = logits({"input_embedding_scale": 2.5})
    np.testing.assert_allclose(scaled, logits({}, embed_by=2.5), rtol=1e-5, atol=1e-5)
    assert not np.allclose(scaled, base)


@pytest.mark.parametrize("fields, match", [
    ({"conv_kernel_size": 4}, "DFlash 2 drafter"),
    ({"final_logit_softcapping": "big"}, "final_logit_softcapping must be"),
    ({"output_multiplier": None, "input_embedding_scale": [1]}, "input_embedding_scale must be a number"),
])
def test_unsupported_or_malformed_drafter_fields(qwen3, tmp_path, fields, match):
    from mlx_blockpilot.errors import BlockPilotError

    write_draft(tmp_path / "d", qwen3.cfg, qwen3.mask_id, target_layer_ids=(0, 2, 3))
    with_fields(tmp_path / "d", fields)
    with pytest.raises(BlockPilotError, match=match):
        load_draft(tmp_path / "d")
