"""Drafter training: distilled data, the block-sparse training forward, the CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from test_decode import make_prompt, no_eos, reference

from mlx_blockpilot import target
from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import DraftConfig, load_draft
from mlx_blockpilot.errors import BlockPilotError
from mlx_blockpilot.cli.train_draft import main
from mlx_blockpilot.training.distill import Example, distill, greedy_batch, load_data
from mlx_blockpilot.training.draft_trainer import (
    block_hidden,
    block_loss,
    feature_scale,
    init_draft,
    make_config,
    prepare_loss,
    read_log,
    sample_batch,
    train,
    unscaled,
)

LAYERS = (1, 3)


def prompts(n=5):
    return [make_prompt(3 + 7 * i, seed=10 + i) for i in range(n)]


def test_distilled_tokens_are_greedy_and_features_are_the_forward_pass(tiny):
    ps = prompts()
    seqs = greedy_batch(tiny.model, ps, LAYERS, max_new_tokens=12)
    for p, s in zip(ps, seqs):
        assert s.prompt_len == len(p)
        assert s.tokens[: len(p)].tolist() == p
        assert s.tokens[len(p) :].tolist() == reference(tiny.model, p, max_tokens=12)
        _, hidden = target.forward(tiny.model, mx.array(s.tokens[None, :-1]), make_prompt_cache(tiny.model), LAYERS)
        assert s.features.dtype == np.float16
        assert s.features.shape == (len(s.tokens) - 1, len(LAYERS) * tiny.cfg["hidden_size"])
        np.testing.assert_allclose(s.features.astype(np.float32), np.array(hidden[0]), atol=2e-2, rtol=1e-2)


def test_distill_stops_at_eos_and_resumes(qwen3, tmp_path):
    ps = prompts(4)
    ref = reference(qwen3.model, ps[2], max_tokens=12)
    eos = ref[4]
    stats = list(distill(qwen3.model, ps[:2], tmp_path, LAYERS, 12, batch_size=3, eos=[eos]))
    assert sum(s["prompts"] for s in stats) == 2
    more = list(distill(qwen3.model, ps, tmp_path, LAYERS, 12, batch_size=3, eos=[eos]))
    assert sum(s["prompts"] for s in more) == 2  # only the two new prompts
    data = load_data(tmp_path)
    assert len(data) == 4
    by_prompt = {tuple(e.tokens[: e.prompt_len].tolist()): e for e in data}
    answer = by_prompt[tuple(ps[2])].tokens[len(ps[2]) :].tolist()
    assert answer == ref[: ref.index(eos) + 1]
    with pytest.raises(Exception, match="target layers"):
        list(distill(qwen3.model, ps, tmp_path, (0,), 12))
    with pytest.raises(BlockPilotError, match="other prompts"):  # "done" indices would point at other prompts
        list(distill(qwen3.model, ps[::-1], tmp_path, LAYERS, 12, batch_size=3, eos=[eos]))


def _examples(tiny, n=3, length=40, seed=0):
    rng = np.random.default_rng(seed)
    F = len(tiny.draft.config.target_layer_ids) * tiny.cfg["hidden_size"]
    return [
        Example(rng.integers(5, 300, size=length).astype(np.int32), 10, rng.standard_normal((length - 1, F)).astype(np.float16))
        for _ in range(n)
    ]


@pytest.mark.parametrize("layer_types", [None, ("sliding_attention",)])
def test_training_forward_matches_the_inference_drafter(tiny, layer_types):
    draft = tiny.draft
    if layer_types:
        cfg = dict(draft.config.to_dict(), layer_types=list(layer_types) * draft.config.num_hidden_layers, sliding_window=6)
        draft = type(draft)(DraftConfig.from_dict(cfg))
        draft.load_weights(list(tree_flatten(tiny.draft.parameters())))
    B = 5
    ex = _examples(tiny)
    anchors = np.array([[12, 20, 31], [25, 10, 17]])
    batch = sample_batch(ex, [0, 2], 3, B, tiny.mask_id, None, anchors=anchors)
    h = np.array(block_hidden(draft, tiny.model, batch)).reshape(2, 3, B, -1)
    for r, i in enumerate([0, 2]):
        for b, p in enumerate(anchors[r]):
            block = mx.array([[int(ex[i].tokens[p])] + [tiny.mask_id] * (B - 1)])
            ctx = mx.array(ex[i].features[None, :p].astype(np.float32))
            ref = draft(target.embed(tiny.model, block), ctx, draft.make_cache())
            np.testing.assert_allclose(h[r, b], np.array(ref[0]), atol=1e-4, rtol=1e-4)


def test_no_leak_from_the_anchor_or_later_positions(tiny):
    B, p = 6, 17
    ex = _examples(tiny, n=1)
    anchors = np.array([[p]])
    rng = np.random.default_rng(0)

    def loss(features):
        e = Example(ex[0].tokens, ex[0].prompt_len, features)
        batch = sample_batch([e], [0], 1, B, tiny.mask_id, None, anchors=anchors)
        t = prepare_loss(batch, 2.0, tiny.cfg["vocab_size"], 0, rng)
        return block_loss(tiny.draft, tiny.model, batch, t, None).item()

    base = loss(ex[0].features)
    for pos in (p, p + 1, p + 4, len(ex[0].tokens) - 2):
        f = ex[0].features.copy()
        f[pos] += 3.0
        assert loss(f) == base, f"feature at {pos} (anchor {p}) leaked into the block"
    for pos in (p - 1, 0):
        f = ex[0].features.copy()
        f[pos] += 3.0
        assert abs(loss(f) - base) > 1e-5, f"feature at {pos} before the anchor is not seen"


def test_blocks_in_one_batch_do_not_see_each_other(tiny):
    B = 4
    ex = _examples(tiny, n=1)
    batch = sample_batch(ex, [0], 2, B, tiny.mask_id, None, anchors=np.array([[15, 25]]))
    h = np.array(block_hidden(tiny.draft, tiny.model, batch))
    batch["blocks"][0, 1, 0] += 1  # another anchor token in block 1
    batch["features"][0, 15:] += 1.0  # features block 0 must not see
    h2 = np.array(block_hidden(tiny.draft, tiny.model, batch))
    np.testing.assert_array_equal(h[0, :B], h2[0, :B])
    assert not np.allclose(h[0, B:], h2[0, B:])


def test_sampled_softmax_keeps_labels_and_corrects_negatives(qwen3):
    ex = _examples(qwen3, n=2)
    batch = sample_batch(ex, [0, 1], 4, 8, qwen3.mask_id, np.random.default_rng(0))
    t = prepare_loss(batch, 3.0, qwen3.cfg["vocab_size"], 64, np.random.default_rng(1))
    cand = np.array(t["candidates"])
    assert len(set(cand.tolist())) == len(cand) == 64
    assert (cand[np.array(t["labels"])] == batch["labels"][batch["valid"]]).all()
    corr = np.array(t["correction"])
    n_pos = len(np.unique(batch["labels"][batch["valid"]]))
    assert (corr[:n_pos] == 0).all() and (corr[n_pos:] > 0).all()


def _distilled(tiny, tmp_path, n=6, max_new=24):
    ps = [make_prompt(5 + 3 * i, seed=40 + i) for i in range(n)]
    list(distill(tiny.model, ps, tmp_path / "data", LAYERS, max_new, batch_size=4))
    return load_data(tmp_path / "data")


@pytest.mark.parametrize("layer_id", [0, 2, 3])
def test_logits_from_a_tapped_layer_equal_the_forward_pass(tiny, layer_id):
    n = target.num_layers(tiny.model)
    layer_id = min(layer_id, n - 1)
    tokens = mx.array([make_prompt(23, seed=3)])
    logits, h = target.forward(tiny.model, tokens, make_prompt_cache(tiny.model), [layer_id])
    np.testing.assert_allclose(np.array(target.logits_from_layer(tiny.model, h, layer_id)), np.array(logits),
                               atol=1e-4, rtol=1e-4)
    ids = mx.array([3, 7, 40])
    rows = target.logits_from_layer(tiny.model, h, layer_id, target.head_rows(tiny.model, ids))
    np.testing.assert_allclose(np.array(rows), np.array(logits[..., ids]), atol=1e-4, rtol=1e-4)


def test_soft_labels_are_the_targets_distribution_at_each_label(qwen3, tmp_path):
    from mlx_blockpilot.training.draft_trainer import soft_label_agreement, soft_labels

    data = _distilled(qwen3, tmp_path)
    head = target.head_weight(qwen3.model)
    soft = soft_labels(qwen3.model, data, LAYERS, head, 5, batch_size=4, progress=False)
    e, s = data[2], soft[2]
    assert s.ids.shape == s.p.shape == (len(e.tokens) - 1, 5)
    np.testing.assert_allclose(s.p.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    # the distribution after position j is the target's own at j, from a real forward pass
    logits, _ = target.forward(qwen3.model, mx.array(e.tokens[None, :-1]), make_prompt_cache(qwen3.model), LAYERS)
    top = np.argsort(-np.array(logits[0]), axis=-1)[:, :5]
    assert (np.sort(s.ids, -1) == np.sort(top, -1)).mean() > 0.95
    # greedy answers: the most likely soft label is the next answer token
    assert soft_label_agreement(data, soft, np.arange(qwen3.cfg["vocab_size"])) > 0.95
    batch = sample_batch(data, [1, 2], 4, 5, qwen3.mask_id, np.random.default_rng(0), soft=soft)
    best = np.take_along_axis(batch["soft_ids"], np.argmax(batch["soft_p"], -1)[..., None], -1)[..., 0]
    assert (best[batch["valid"]] == batch["labels"][batch["valid"]]).mean() > 0.95
    # a one-hot soft label on the target's token is the hard loss
    draft = init_draft(qwen3.model, make_config(qwen3.model, 1, LAYERS, 5, qwen3.mask_id))
    t = prepare_loss(batch, 3.0, qwen3.cfg["vocab_size"], 0, np.random.default_rng(0))
    hard = block_loss(draft, qwen3.model, batch, t, head).item()
    onehot = dict(t, soft_ids=t["labels"][:, None], soft_p=mx.ones((t["labels"].shape[0], 1)))
    assert block_loss(draft, qwen3.model, batch, onehot, head, soft_weight=1.0).item() == pytest.approx(hard, rel=1e-5)
    # half on the target's token, half on another: the mean of the two hard losses; soft_weight mixes
    other = (t["labels"] + 1) % qwen3.cfg["vocab_size"]
    hard2 = block_loss(draft, qwen3.model, batch, dict(t, labels=other), head).item()
    half = dict(t, soft_ids=mx.stack([t["labels"], other], axis=1), soft_p=mx.full((other.shape[0], 2), 0.5))
    assert block_loss(draft, qwen3.model, batch, half, head, soft_weight=1.0).item() == pytest.approx((hard + hard2) / 2, rel=1e-5)
    mixed = block_loss(draft, qwen3.model, batch, half, head, soft_weight=0.25).item()
    assert mixed == pytest.approx(0.75 * hard + 0.25 * (hard + hard2) / 2, rel=1e-5)
    with pytest.raises(BlockPilotError, match="soft labels need"):
        prepare_loss(batch, 3.0, qwen3.cfg["vocab_size"], 64, np.random.default_rng(0))
    recs = train(qwen3.model, qwen3.tokenizer, draft, data, tmp_path / "out", 30, batch_size=4, blocks_per_seq=4,
                 lr=3e-3, warmup=2, vocab_sample=0, progress=False, soft_k=5, soft_weight=0.5)
    assert recs[0]["soft_labels"] == 5 and recs[0]["soft_label_agreement"] > 0.95
    losses = [r["loss"] for r in recs if "loss" in r]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_loss_decreases_when_overfitting(qwen3, tmp_path):
    data = _distilled(qwen3, tmp_path)
    cfg = make_config(qwen3.model, 1, LAYERS, 8, qwen3.mask_id)
    draft = init_draft(qwen3.model, cfg)
    recs = train(qwen3.model, qwen3.tokenizer, draft, data, tmp_path / "out", 40, batch_size=4, blocks_per_seq=4,
                 lr=3e-3, warmup=2, vocab_sample=0, progress=False)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


def test_teacher_forced_acceptance_replays_real_decoding(qwen3, tmp_path):
    """The validation estimate chains rounds as decoding does, so it equals decoding's acceptance."""
    from mlx_blockpilot.training.draft_trainer import teacher_forced_acceptance

    data = _distilled(qwen3, tmp_path, n=4, max_new=24)
    cfg = make_config(qwen3.model, 1, LAYERS, 6, qwen3.mask_id)
    draft = init_draft(qwen3.model, cfg)
    train(qwen3.model, qwen3.tokenizer, draft, data, tmp_path / "out", 80, batch_size=4, blocks_per_seq=8,
          lr=3e-3, warmup=2, vocab_sample=0, progress=False)  # overfits: many drafts are accepted
    for B in (3, 5):
        est = teacher_forced_acceptance(draft, qwen3.model, data, B, None, np.float32(1.0))
        lengths = []
        for e in data:
            r = generate(qwen3.model, draft, no_eos(qwen3.tokenizer), e.tokens[: e.prompt_len].tolist(),
                         block_size=B, max_tokens=e.answer_len)
            assert r.tokens == e.tokens[e.prompt_len :].tolist()
            lengths += r.acceptance_lengths
        assert np.mean(lengths) > 1.3, "the drafter should have learned something"
        assert est["mean"] == pytest.approx(np.mean(lengths), abs=0.05), B
        assert len(est["position_hit_rate"]) == B - 1


def test_preconditioned_fc_is_folded_exactly(qwen3, tmp_path):
    """Training reads features / scale; the saved drafter reads raw features and computes the same."""
    data = _distilled(qwen3, tmp_path)
    scale = feature_scale(data)
    raw = np.concatenate([e.features.astype(np.float32) for e in data])
    np.testing.assert_allclose(np.sqrt(((raw / np.array(scale)) ** 2).mean(0)), 1.0, rtol=1e-3)
    cfg = make_config(qwen3.model, 1, LAYERS, 5, qwen3.mask_id)
    trained = init_draft(qwen3.model, cfg, seed=3)
    trained.fc.weight = trained.fc.weight * mx.random.uniform(0.5, 2.0, trained.fc.weight.shape)
    batch = sample_batch(data, [0, 1], 3, 5, qwen3.mask_id, np.random.default_rng(0))
    scaled = dict(batch, features=batch["features"] / np.array(scale))
    np.testing.assert_allclose(np.array(block_hidden(unscaled(trained, scale), qwen3.model, batch)),
                               np.array(block_hidden(trained, qwen3.model, scaled)), atol=1e-4, rtol=1e-4)

    draft = init_draft(qwen3.model, cfg)
    before = np.array(block_hidden(draft, qwen3.model, batch))
    train(qwen3.model, qwen3.tokenizer, draft, data, tmp_path / "out", 1, batch_size=2, blocks_per_seq=2,
          lr=1e-9, warmup=0, vocab_sample=0, progress=False)
    np.testing.assert_allclose(np.array(block_hidden(draft, qwen3.model, batch)), before, atol=1e-3, rtol=1e-3)
    saved = load_draft(tmp_path / "out")
    np.testing.assert_allclose(np.array(block_hidden(saved, qwen3.model, batch)),
                               np.array(block_hidden(draft, qwen3.model, batch)), atol=1e-5, rtol=1e-5)


def test_warm_start_grows_a_drafter_without_changing_what_it_proposes(qwen3, tmp_path):
    """A 1-layer drafter grown to 3 layers proposes exactly what it did; then training moves the new layers."""
    from mlx_blockpilot.draft import save_draft
    from mlx_blockpilot.training.draft_trainer import warm_start

    data = _distilled(qwen3, tmp_path)
    small = init_draft(qwen3.model, make_config(qwen3.model, 1, LAYERS, 5, qwen3.mask_id), seed=1)
    small.fc.weight = small.fc.weight * 1.5  # not what a fresh init would give
    save_draft(small, tmp_path / "small")
    big = init_draft(qwen3.model, make_config(qwen3.model, 3, LAYERS, 5, qwen3.mask_id), seed=2)
    assert warm_start(big, tmp_path / "small") == 2
    batch = sample_batch(data, [0, 1, 2], 3, 5, qwen3.mask_id, np.random.default_rng(0))
    np.testing.assert_allclose(np.array(block_hidden(big, qwen3.model, batch)),
                               np.array(block_hidden(small, qwen3.model, batch)), atol=1e-5, rtol=1e-5)
    new = {k: np.array(v) for k, v in tree_flatten(big.layers[2].parameters())}
    assert not new["self_attn.o_proj.weight"].any() and not new["mlp.down_proj.weight"].any()
    assert new["self_attn.q_proj.weight"].any()  # the rest of a new layer keeps its initial weights
    train(qwen3.model, qwen3.tokenizer, big, data, tmp_path / "out", 5, batch_size=2, blocks_per_seq=4,
          lr=1e-3, warmup=0, vocab_sample=0, progress=False)
    assert np.array(big.layers[1].self_attn.o_proj.weight).any() and np.array(big.layers[2].mlp.down_proj.weight).any()
    # a reduced vocabulary of the same size comes along (the same tokens to propose); another size does not
    from mlx_blockpilot.training.draft_trainer import set_draft_vocab

    reduced = init_draft(qwen3.model, make_config(qwen3.model, 1, LAYERS, 5, qwen3.mask_id, draft_vocab_size=40))
    set_draft_vocab(reduced, np.arange(3, 123, 3))
    save_draft(reduced, tmp_path / "reduced")
    grown = init_draft(qwen3.model, make_config(qwen3.model, 2, LAYERS, 5, qwen3.mask_id, draft_vocab_size=40))
    warm_start(grown, tmp_path / "reduced")
    assert np.array(grown.draft_ids()).tolist() == list(range(3, 123, 3))
    other = init_draft(qwen3.model, make_config(qwen3.model, 2, LAYERS, 5, qwen3.mask_id, draft_vocab_size=30))
    warm_start(other, tmp_path / "reduced")
    assert np.array(other.draft_ids()).tolist() == list(range(30))
    # a source with more layers, or target layers the drafter does not tap, is refused
    with pytest.raises(BlockPilotError, match="another shape"):
        warm_start(small, tmp_path / "out")
    other = init_draft(qwen3.model, make_config(qwen3.model, 3, (0, 2), 5, qwen3.mask_id))
    with pytest.raises(BlockPilotError, match="must include all of them"):
        warm_start(other, tmp_path / "small")


def test_warm_start_adds_target_layers_as_zero_columns_of_fc(qwen3, tmp_path):
    """A drafter tapping layers (1, 3) grown to tap (0, 1, 3) proposes what it did whatever layer 0
    holds (its fc columns start at zero); a tap set that drops a source layer is refused."""
    from mlx_blockpilot.draft import save_draft
    from mlx_blockpilot.training.draft_trainer import warm_start

    data = _distilled(qwen3, tmp_path)
    small = init_draft(qwen3.model, make_config(qwen3.model, 1, LAYERS, 5, qwen3.mask_id), seed=1)
    small.fc.weight = small.fc.weight * mx.random.uniform(0.5, 2.0, small.fc.weight.shape)
    save_draft(small, tmp_path / "small")
    wide = init_draft(qwen3.model, make_config(qwen3.model, 1, (0, 1, 3), 5, qwen3.mask_id), seed=2)
    assert warm_start(wide, tmp_path / "small") == 0
    batch = sample_batch(data, [0, 1, 2], 3, 5, qwen3.mask_id, np.random.default_rng(0))
    extra = np.random.default_rng(1).normal(0, 30, batch["features"].shape[:-1] + (qwen3.cfg["hidden_size"],))
    widened = dict(batch, features=np.concatenate([extra.astype(np.float32), batch["features"]], axis=-1))
    np.testing.assert_allclose(np.array(block_hidden(wide, qwen3.model, widened)),
                               np.array(block_hidden(small, qwen3.model, batch)), atol=1e-5, rtol=1e-5)
    H = qwen3.cfg["hidden_size"]
    assert not np.array(wide.fc.weight[:, :H]).any()
    with pytest.raises(BlockPilotError, match="must include all of them"):
        warm_start(init_draft(qwen3.model, make_config(qwen3.model, 1, (0, 3), 5, qwen3.mask_id)), tmp_path / "small")


def test_validation_sequences_come_from_the_first_data_set():
    from mlx_blockpilot.training.draft_trainer import split_validation

    def seqs(first, n):
        return [Example(np.array([first + i, 1], np.int32), 1, np.zeros((1, 2), np.float16)) for i in range(n)]

    one, two = seqs(0, 10), seqs(100, 7)
    ids = lambda xs: [int(e.tokens[0]) for e in xs]
    train1, val1 = split_validation([one], 3)
    train2, val2 = split_validation([one, two], 3)
    assert ids(val1) == ids(val2) == [0, 4, 9]  # spread over the first set, whatever follows it
    assert ids(train2) == ids(train1) + list(range(100, 107))
    assert split_validation([one, two], 0) == (one + two, [])
    with pytest.raises(BlockPilotError, match="leaves no sequence of the first data set"):
        split_validation([seqs(0, 3), two], 3)


def _cli(tiny, prompts_file, out, steps, *extra):
    return main([
        "--target", str(tiny.target_dir), "--prompts", str(prompts_file), "--out", str(out),
        "--holdout", "2", "--min-chars", "1", "--target-layer-ids", *map(str, LAYERS), "--block-size", "6",
        "--max-new-tokens", "16", "--steps", str(steps), "--batch", "2", "--blocks-per-seq", "3",
        "--checkpoint-every", "2", "--eval-every", "3", "--eval-tokens", "12", "--eval-block-sizes", "3",
        "--vocab-sample", "100", "--no-progress", *extra,
    ])


def test_cli_writes_a_loadable_lossless_drafter_and_resumes(llama, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(["the quick brown fox", "hello world", "what is the capital of france?",
                             "speculative decoding drafts", "tiny tokenizer for tests", "paris is the capital"]))
    full, part = tmp_path / "full", tmp_path / "part"
    assert _cli(llama, pf, full, 6) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["sequences"] == 4 and summary["held_out_prompts"] == 2
    assert set(summary["held_out_acceptance"]) == {"3"}
    for f in ("config.json", "model.safetensors", "loss.png", "train_log.jsonl"):
        assert (full / f).is_file()
    keys = set(mx.load(str(full / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.q_norm.weight", "layers.0.mlp.down_proj.weight"} <= keys
    draft = load_draft(full)
    assert draft.config.target_layer_ids == LAYERS and draft.config.block_size == 6
    prompt = make_prompt(9, seed=5)
    ref = reference(llama.model, prompt, max_tokens=30)
    for b in (2, 6, 9):
        r = generate(llama.model, draft, no_eos(llama.tokenizer), prompt, block_size=b, max_tokens=30)
        assert r.tokens == ref

    assert _cli(llama, pf, part, 6, "--stop-after", "4") == 0
    first = [r for r in read_log(part / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert _cli(llama, pf, part, 6, "--resume") == 0
    log = [r for r in read_log(part / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[:4] == first  # steps 1-4 were not run again (their timings would differ)
    a, b = mx.load(str(full / "model.safetensors")), mx.load(str(part / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    assert _cli(llama, tmp_path / "missing.txt", tmp_path / "x", 1) == 2
    assert "error: " in capsys.readouterr().err


def test_token_file_round_trip_and_features_rebuilt_by_prefill(tiny, tmp_path):
    from mlx_blockpilot.training.distill import featurize, read_token_file, write_token_file

    data = _distilled(tiny, tmp_path)
    write_token_file(data, tmp_path / "tokens.safetensors", {"what": "test"})
    seqs = read_token_file(tmp_path / "tokens.safetensors")
    assert [s.tokens.tolist() for s in seqs] == [e.tokens.tolist() for e in data]
    assert [s.prompt_len for s in seqs] == [e.prompt_len for e in data]
    stats = list(featurize(tiny.model, seqs, tmp_path / "rebuilt", LAYERS, batch_size=4))
    assert sum(s["prompts"] for s in stats) == len(data)
    rebuilt = {tuple(e.tokens.tolist()): e for e in load_data(tmp_path / "rebuilt")}
    for e in data:  # teacher forcing gives the features the target computed while generating
        r = rebuilt[tuple(e.tokens.tolist())]
        np.testing.assert_allclose(r.features.astype(np.float32), e.features.astype(np.float32), atol=2e-2, rtol=2e-2)
        # and the target's greedy token after every position: in its own answers, the next token
        assert isinstance(r.features, np.memmap) or isinstance(r.features.base, np.memmap)  # read from disk when used
        assert r.labels[e.prompt_len - 1 :].tolist() == e.tokens[e.prompt_len :].tolist()
    (tmp_path / "junk.safetensors").write_bytes(b"nonsense")
    with pytest.raises(BlockPilotError, match="cannot read token file"):
        read_token_file(tmp_path / "junk.safetensors")


def test_written_text_trains_on_the_targets_greedy_tokens_only_while_the_text_agrees(tiny, tmp_path):
    """Text that is not the target's own answer: labels are the target's greedy tokens, and a
    block's position k counts only while the text's tokens before it are greedy too."""
    from mlx_blockpilot.training.distill import featurize

    tokens = np.array(make_prompt(30, seed=8), np.int32)
    seqs = list(featurize(tiny.model, [Example(tokens, 6, np.zeros((0, 0), np.float16))], tmp_path / "d", LAYERS))
    assert seqs[0]["prompts"] == 1
    e = load_data(tmp_path / "d")[0]
    logits, _ = target.forward(tiny.model, mx.array(tokens[None, :-1]), make_prompt_cache(tiny.model), LAYERS)
    assert e.labels.tolist() == np.array(mx.argmax(logits[0], axis=-1)).tolist()
    # make the text agree with the target at some positions, so that deeper positions count there
    greedy = e.labels.copy()
    text = tokens.copy()
    text[[11, 12, 13, 20]] = greedy[[10, 11, 12, 19]]
    e = Example(text, 6, e.features, greedy)
    B = 5
    anchors = np.array([[6, 10, 18, 27]])
    batch = sample_batch([e], [0], 4, B, tiny.mask_id, None, anchors=anchors)
    for b, p in enumerate(anchors[0]):
        for k in range(1, B):
            want = p + k < len(text) and all(text[p + j] == greedy[p + j - 1] for j in range(1, k))
            assert batch["valid"][0, b, k - 1] == want, (p, k)
            if want:
                assert batch["labels"][0, b, k - 1] == greedy[p + k - 1]
    assert batch["valid"][0, 1].tolist() == [True, True, True, True]  # text 11-13 agree: all of anchor 10's block


def test_text_sequences_are_the_chat_template_of_prompt_and_answer(qwen3):
    from mlx_blockpilot.prompts import encode_chat
    from mlx_blockpilot.training.distill import text_sequences

    tok = qwen3.tokenizer
    pairs = [("hello world", "the quick brown fox"), ("held out prompt", "x y"), ("a " * 200, "too long"),
             ("what is this", "paris is the capital " * 20)]
    seqs = text_sequences(tok, pairs, max_prompt_tokens=50, max_tokens=40, skip=["held out prompt "])
    assert len(seqs) == 2
    head = encode_chat(tok, [{"role": "user", "content": "hello world"}])
    assert seqs[0].prompt_len == len(head) and seqs[0].tokens[: len(head)].tolist() == head
    full = tok.apply_chat_template([{"role": "user", "content": "hello world"},
                                    {"role": "assistant", "content": "the quick brown fox"}])
    assert seqs[0].tokens.tolist() == list(full)
    assert len(seqs[1].tokens) == 40  # cut at max_tokens


def test_select_draft_vocab_keeps_the_most_frequent_answer_tokens():
    from mlx_blockpilot.training.draft_trainer import select_draft_vocab

    e = Example(np.array([9, 9, 9, 5, 5, 5, 7, 7, 3], np.int32), 3, np.zeros((8, 2), np.float16))
    assert select_draft_vocab([e], 2, 12).tolist() == [5, 7]
    assert select_draft_vocab([e], 3, 12, always=[1]).tolist() == [1, 5, 7]
    # fewer answer tokens than asked for: then prompt tokens (9), then the lowest ids
    assert select_draft_vocab([e], 6, 12).tolist() == [0, 1, 3, 5, 7, 9]


def test_cli_reduced_vocabulary_causal_warm_start_and_token_files(llama, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(["the quick brown fox", "hello world", "what is the capital of france?",
                             "speculative decoding drafts", "tiny tokenizer for tests", "paris is the capital"]))
    first = tmp_path / "first"
    assert _cli(llama, pf, first, 2, "--export-tokens", str(tmp_path / "tokens.safetensors")) == 0
    out = tmp_path / "reduced"
    assert _cli(llama, pf, out, 4, "--draft-vocab", "60", "--causal", "--init-from", str(first), "--soft-labels", "4",
                "--val-sequences", "1", "--eval-block-size", "4", "--data-tokens", str(tmp_path / "tokens.safetensors")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequences"] == 3  # 4 sequences of the token file, 1 kept out for validation
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 60 and cfg["is_causal"] is True
    draft = load_draft(out)
    soft = [r for r in read_log(out / "train_log.jsonl") if "soft_labels" in r]
    assert soft[0]["soft_labels"] == 4 and soft[0]["soft_label_agreement"] > 0.9  # greedy answers
    evals = [r for r in read_log(out / "train_log.jsonl") if "val_acceptance" in r]
    assert evals[0]["step"] == 0 and evals[0]["train_cpu_h"] == 0  # where the curve starts
    evals = evals[1:]
    assert evals and all(1 <= r["val_acceptance"] <= 4 and r["train_cpu_h"] > 0 and r["block_size"] == 4 for r in evals)
    assert all(len(r["val_position_hit_rate"]) == 3 and "acceptance" in r for r in evals)
    prompt = make_prompt(9, seed=6)
    ref = reference(llama.model, prompt, max_tokens=30)
    for b in (2, 5, 8):
        assert generate(llama.model, draft, no_eos(llama.tokenizer), prompt, block_size=b, max_tokens=30).tokens == ref
    # several data folders, several token files: their sequences together
    both = tmp_path / "both"
    assert _cli(llama, pf, both, 1, "--data", str(first / "data"), str(out / "data"), "--eval-block-sizes", "none") == 0
    assert json.loads((both / "summary.json").read_text())["sequences"] == 8
    tokens = str(tmp_path / "tokens.safetensors")
    assert _cli(llama, pf, tmp_path / "twice", 1, "--data-tokens", tokens, tokens, "--eval-block-sizes", "none") == 0
    assert json.loads((tmp_path / "twice" / "summary.json").read_text())["sequences"] == 8
    capsys.readouterr()
    assert _cli(llama, pf, tmp_path / "bad", 2, "--init-from", str(tmp_path / "missing")) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # data captured at other target layers is refused, not trained on
    assert _cli(llama, pf, tmp_path / "other", 2, "--data", str(first / "data"), "--target-layer-ids", "0", "1") == 2
    assert "captured at target layers" in capsys.readouterr().err and not (tmp_path / "other").exists()
    # an error found after distillation keeps what distillation wrote (it can take hours)
    assert _cli(llama, pf, tmp_path / "late", 2, "--val-sequences", "50") == 2
    assert "--val-sequences 50 leaves no sequence" in capsys.readouterr().err and (tmp_path / "late" / "data").is_dir()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--target", "/nonexistent/target"], "does not exist"),
        (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
        (["--target-layer-ids", "1", "99"], "outside the target's layers"),
        (["--block-size", "0"], "--block-size must be >= 2"),
        (["--mask-token-id", "-1"], "--mask-token-id -1 is outside the vocabulary"),
        (["--draft-vocab", "0"], "--draft-vocab must be in"),
        (["--val-sequences", "-1"], "--val-sequences must be >= 0"),
        (["--eval-block-size", "1"], "--eval-block-size must be >= 2"),
        (["--soft-weight", "1.5"], "--soft-weight in 0..1"),
        (["--soft-labels", "8", "--vocab-sample", "100"], "soft labels need a reduced draft vocabulary"),
        (["--out", "/proc/1/draft-out"], "cannot write into"),
    ],
)
def test_bad_input_leaves_no_out_directory(llama, tmp_path, capsys, extra, match):
    pf = tmp_path / "prompts.txt"
    pf.write_text("the quick brown fox\nhello world\nparis is the capital\n")
    out = tmp_path / "out"
    assert _cli(llama, pf, out, 1, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert not out.exists()


def test_default_mask_id_avoids_end_of_sequence_tokens(qwen3):
    from mlx_blockpilot.training.draft_trainer import default_mask_id

    assert default_mask_id(qwen3.tokenizer) == qwen3.mask_id

    class Tok:
        eos_token_ids = [0, 2]
        pad_token_id = 2

        def get_vocab(self):
            return {"a": 0, "b": 1, "c": 2}

    assert default_mask_id(Tok()) == 1
