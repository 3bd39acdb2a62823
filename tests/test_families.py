"""Every supported target family decodes losslessly: tiny random models built with mlx-lm's
own classes, greedy output equal to mlx-lm's decoding of the target alone."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from fixtures import write_draft
from test_decode import make_prompt, no_eos, reference
from test_sampling import RUNS, STEPS, VOCAB, assert_same_distribution, exact_distribution, word_tokenizer

from mlx_blockpilot import target
from mlx_blockpilot.cache import make_cache
from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import load_draft
from mlx_blockpilot.errors import BlockPilotError

H, LAYERS, V = 64, 4, 320
BASE = dict(hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=V, rope_theta=10000.0,
            max_position_embeddings=2048, tie_word_embeddings=False)
HYBRID = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_conv_kernel_dim=4, full_attention_interval=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32,
           norm_topk_prob=True)
CONFIGS = {
    "qwen3_moe": dict(BASE, **MOE),
    "qwen3_next": dict(BASE, **HYBRID, **MOE, shared_expert_intermediate_size=64, partial_rotary_factor=0.5),
    "qwen3_5": dict(model_type="qwen3_5", text_config=dict(BASE, model_type="qwen3_5_text", **HYBRID,
                    rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "type": "default"})),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", text_config=dict(BASE, model_type="qwen3_5_moe_text", **HYBRID, **MOE,
                        shared_expert_intermediate_size=64,
                        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "type": "default"})),
    "gpt_oss": dict(BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3_text": dict(BASE, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16,
                        rope_local_base_freq=10000.0),
    "gemma4_text": dict(BASE, global_head_dim=16, vocab_size_per_layer_input=V, num_kv_shared_layers=2,
                        hidden_size_per_layer_input=8, sliding_window=8, sliding_window_pattern=2,
                        use_double_wide_mlp=False, tie_word_embeddings=True, final_logit_softcapping=30.0),
}


# Embedding scales that keep greedy answers varied (Gemma 4's outputs collapse to one token otherwise).
EMBED = {"gemma4_text": 0.03}


def build(model_type, **overrides):
    """A random model of ``model_type`` from mlx-lm's own classes (embeddings well spread)."""
    config = dict(CONFIGS[model_type], model_type=model_type)
    if "text_config" in config:
        config["text_config"] = dict(config["text_config"], **overrides)
    else:
        config.update(overrides)
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    text = model.language_model if "language_model" in model else model
    text.model.embed_tokens.weight = mx.random.normal(text.model.embed_tokens.weight.shape) * EMBED.get(model_type, 1.0)
    if model_type == "gemma4_text":  # its per-layer embeddings start at zero: make them count
        text.model.embed_tokens_per_layer.weight = mx.random.normal(text.model.embed_tokens_per_layer.weight.shape)
    mx.eval(model.parameters())
    model.eval()
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory, qwen3):
    model = build(request.param)
    root = tmp_path_factory.mktemp(request.param)
    cfg = dict(hidden_size=H, vocab_size=V, rope_theta=10000.0, max_position_embeddings=2048, num_hidden_layers=LAYERS)
    write_draft(root / "d", cfg, qwen3.mask_id, target_layer_ids=(1, 3))
    return request.param, model, load_draft(root / "d"), no_eos(qwen3.tokenizer)


@pytest.mark.parametrize("length", [3, 40])
def test_greedy_equals_mlx_lm(family, length):
    name, model, draft, tok = family
    prompt = make_prompt(length, seed=length)
    ref = reference(model, prompt, max_tokens=30)
    assert len(set(ref)) > 3, "a model that repeats one token would make this test trivial"
    for block in (1, 2, 4, 7, 16):
        r = generate(model, draft, tok, prompt, block_size=block, max_tokens=30, prefill_step_size=16)
        assert r.tokens == ref, (name, length, block)


def test_eos_inside_a_block_and_multi_turn_reuse(family, qwen3):
    name, model, draft, tok = family
    prompt = make_prompt(9, seed=5)
    ref = reference(model, prompt, max_tokens=30)
    k = max(i for i in range(1, 30) if ref[i] not in ref[:i])  # an EOS that first appears mid-answer
    for block in (6, 1):  # plain rounds are built one ahead: the one after EOS is taken back
        r = generate(model, draft, no_eos(qwen3.tokenizer, [ref[k]]), prompt, block_size=block, max_tokens=30)
        assert r.tokens == ref[: k + 1] and r.finish_reason == "stop", name
    cache = make_cache(model, draft)
    conversation = make_prompt(20, seed=3)
    for turn in range(3):
        block = 1 if turn == 1 else 5  # a plain turn in between: its cache is left exact
        r = generate(model, draft, tok, conversation, block_size=block, refine=False, max_tokens=12, prompt_cache=cache)
        assert r.tokens == reference(model, conversation, max_tokens=12), (name, turn)
        if turn:  # the conversation continues: nothing to rewind, only the new tokens are prefilled
            assert r.reused_tokens == len(conversation) - 8
        conversation = conversation + r.tokens + make_prompt(7, seed=10 + turn)
    other = conversation[:10] + make_prompt(6, seed=30)  # diverges: attention caches rewind, recurrent ones restart
    r = generate(model, draft, tok, other, block_size=3, max_tokens=12, prompt_cache=cache)
    assert r.tokens == reference(model, other, max_tokens=12), name


def test_unsupported_family_is_named_clearly():
    class Fake:
        model_type = "mamba"

    with pytest.raises(BlockPilotError, match="'mamba' is not supported; use one of .*qwen3_5"):
        target.check_supported(Fake())


@pytest.mark.slow
def test_hybrid_sampling_distribution(tmp_path):
    model = build("qwen3_5", vocab_size=VOCAB)
    text = model.language_model
    text.model.embed_tokens.weight = text.model.embed_tokens.weight * 0.25
    mx.eval(model.parameters())
    cfg = dict(hidden_size=H, vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=2048, num_hidden_layers=LAYERS)
    write_draft(tmp_path / "d", cfg, VOCAB - 1, target_layer_ids=(1, 3), seed=2)
    draft = load_draft(tmp_path / "d")
    prompt = [1, 4, 2, 6, 3]
    exact = exact_distribution(model, prompt, 1.0, 1.0, 0)
    counts, accepted_any, tok = {}, 0, word_tokenizer()
    for seed in range(RUNS):
        r = generate(model, draft, tok, prompt, block_size=3, max_tokens=STEPS, temperature=1.0, seed=seed)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        accepted_any += any(a > 1 for a in r.acceptance_lengths)
    assert accepted_any > 0.05 * RUNS
    assert np.isfinite(list(exact.values())).all()
    assert_same_distribution(counts, exact)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_moe"])
def test_same_tokens_and_acceptance_as_the_official_backend(model_type, qwen3, tmp_path, monkeypatch):
    """z-lab's MLX backend rolls hybrids back its own way; both give mlx-lm's tokens with the
    same acceptance per round."""
    official = pytest.importorskip("dflash.model_mlx", reason="pip install --no-deps dflash==0.1.0")
    cfg = dict(hidden_size=H, vocab_size=V, rope_theta=10000.0, max_position_embeddings=2048, num_hidden_layers=LAYERS)
    write_draft(tmp_path / "d", cfg, qwen3.mask_id, target_layer_ids=(1, 3))
    tok = no_eos(qwen3.tokenizer)
    prompt = make_prompt(21, seed=7)
    model = build(model_type)
    ours = generate(model, load_draft(tmp_path / "d"), tok, prompt, block_size=4, max_tokens=32)
    monkeypatch.setattr(official, "snapshot_download", lambda repo, **kw: str(repo))
    theirs, accepted = [], []
    for r in official.stream_generate(build(model_type), official.load_draft(str(tmp_path / "d")), tok,
                                      mx.array(prompt), block_size=4, max_tokens=32):
        theirs.extend(r.tokens)
        accepted += [r.accepted] if r.accepted else []
    assert ours.tokens == theirs == reference(model, prompt, max_tokens=32)
    assert ours.acceptance_lengths == accepted


@pytest.mark.parametrize("model_type", ["qwen3_5", "gemma3_text", "gpt_oss", "gemma4_text"])
def test_convert_makes_a_lossless_bundle(model_type, qwen3, tmp_path):
    """A saved checkpoint of the family converts into a bundle (same checks as every target)
    that decodes exactly as mlx-lm decodes the checkpoint."""
    import shutil

    from mlx_lm.utils import save_config, save_model

    from mlx_blockpilot import load
    from mlx_blockpilot.conversion import convert

    src = tmp_path / "src"
    model = build(model_type)
    save_model(src, model)
    save_config(dict(CONFIGS[model_type], model_type=model_type), src / "config.json")
    for f in qwen3.target_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, src / f.name)
    cfg = dict(hidden_size=H, vocab_size=V, rope_theta=10000.0, max_position_embeddings=2048, num_hidden_layers=LAYERS)
    write_draft(tmp_path / "d", cfg, qwen3.mask_id, target_layer_ids=(1, 3))
    convert(src, tmp_path / "d", tmp_path / "bundle", verbose=False)
    bundle = load(tmp_path / "bundle")
    prompt = make_prompt(12, seed=8)
    ref = reference(bundle.model, prompt, max_tokens=20)
    assert ref == reference(model, prompt, max_tokens=20)
    r = generate(bundle.model, bundle.draft, no_eos(qwen3.tokenizer), prompt, block_size=4, max_tokens=20)
    assert r.tokens == ref


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_moe"])
def test_train_draft_refuses_layers_that_cannot_initialise_a_drafter(model_type):
    from mlx_blockpilot.training.draft_trainer import init_draft, make_config

    model = build(model_type)
    n = target.num_layers(model)
    cfg = make_config(model, 1, [0, n - 1], 4, 0)  # the sizes are read through the family table
    with pytest.raises(BlockPilotError, match="not shaped like a drafter layer"):
        init_draft(model, cfg)
