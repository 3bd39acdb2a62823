"""Train a DFlash drafter for a target, in MLX (``python -m mlx_blockpilot.train_draft``).

1. Self-distillation (``distill``): the target answers the prompts greedily under
   its chat template; the tapped layer outputs are captured in the same passes.
2. Training, the DFlash recipe: anchors are sampled in the answers; each block is
   ``[anchor token, MASK x (B-1)]`` at the anchor's positions, non-causal inside the
   block (unless the drafter's layer says causal), and sees the context features of
   the positions strictly before the anchor only. Cross-entropy against the target's
   tokens at block positions 1..B-1, weighted ``exp(-(k-1)/gamma)``. The target's
   embedding and head are frozen and shared. Many blocks of many sequences go
   through one pass of the drafter's own layers (``DFlashDraft`` with ``anchors``). The head is the costly part, so the
   softmax runs over the batch's label tokens plus a uniform sample of the rest of
   the vocabulary (``--vocab-sample``; log-correction for the sampled share).
   ``fc`` trains on features divided by their per-column RMS (``feature_scale``),
   folded back into the saved weights. Optionally (``soft_k``) the loss also distils the
   target's top-k distribution at each label (``soft_labels``, computed once from the
   stored features of the deepest tapped layer).
3. Checkpoints (``--resume``), a JSONL log, a loss plot and held-out acceptance
   measured with ``decode.generate``; the output directory is a z-lab drafter.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .. import decode, target
from ..draft import DFlashDraft, DraftConfig, save_draft
from ..errors import BlockPilotError
from . import distill

CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"


# ---------------------------------------------------------------------------
# The drafter to train


def default_layer_ids(num_target_layers: int, count: int = 5) -> List[int]:
    """``count`` target layers spread evenly from layer 1 to the fourth-last."""
    hi = max(1, num_target_layers - 3)
    return sorted({int(round(x)) for x in np.linspace(1, hi, min(count, num_target_layers))})


def default_mask_id(tokenizer) -> int:
    """``<|mask|>`` when the vocabulary has one, else the pad token unless it is an
    end-of-sequence token, else the lowest id that is not one."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|mask|>" in vocab:
        return vocab["<|mask|>"]
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and pad not in eos:
        return int(pad)
    return next(i for i in range(len(eos) + 1) if i not in eos)


def check_shape(num_layers: int, block_size: int) -> None:
    """A drafter needs a layer and a block of at least the anchor and one draft."""
    if block_size < 2:
        raise BlockPilotError(f"--block-size must be >= 2 (the anchor and a draft), got {block_size}")
    if num_layers < 1:
        raise BlockPilotError(f"--layers must be >= 1, got {num_layers}")


def make_config(model, num_layers: int, layer_ids: Sequence[int], block_size: int, mask_id: int,
                causal: Optional[bool] = None, draft_vocab_size: Optional[int] = None) -> DraftConfig:
    """A drafter shaped like the target's layers (so they can initialise it).

    ``causal`` makes attention inside a block causal, so a block of any size up to
    ``block_size`` sees exactly what its prefix saw in training; ``draft_vocab_size``
    restricts the head to that many target tokens (``select_draft_vocab``)."""
    a = target.text_args(model)
    heads = a.num_attention_heads
    n_target = target.num_layers(model)
    bad = [i for i in layer_ids if not 0 <= i < n_target]
    if bad:
        raise BlockPilotError(f"--target-layer-ids {bad} are outside the target's layers 0..{n_target - 1}")
    check_shape(num_layers, block_size)
    if not 0 <= mask_id < a.vocab_size:
        raise BlockPilotError(f"--mask-token-id {mask_id} is outside the vocabulary 0..{a.vocab_size - 1}")
    if draft_vocab_size is not None and not 1 <= draft_vocab_size <= a.vocab_size:
        raise BlockPilotError(f"--draft-vocab must be in 1..{a.vocab_size}, got {draft_vocab_size}")
    return DraftConfig(
        hidden_size=a.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(a, "num_key_value_heads", None) or heads,
        head_dim=getattr(a, "head_dim", None) or a.hidden_size // heads,
        intermediate_size=a.intermediate_size,
        vocab_size=a.vocab_size,
        target_layer_ids=tuple(layer_ids),
        mask_token_id=int(mask_id),
        num_target_layers=n_target,
        rms_norm_eps=a.rms_norm_eps,
        rope_theta=getattr(a, "rope_theta", 10000.0),
        rope_scaling=getattr(a, "rope_scaling", None),
        max_position_embeddings=getattr(a, "max_position_embeddings", None) or 40960,
        block_size=block_size,
        is_causal=causal,
        draft_vocab_size=draft_vocab_size,
    )


def select_draft_vocab(examples: Sequence[distill.Example], size: int, vocab_size: int,
                       always: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` target tokens the drafter may propose, sorted by id: ``always`` (e.g. the
    end-of-sequence ids), then the most frequent answer tokens of ``examples``, then (when
    the answers hold fewer) the most frequent prompt tokens, then the lowest ids."""
    answers, prompts = np.zeros(vocab_size, np.int64), np.zeros(vocab_size, np.int64)
    for e in examples:
        np.add.at(answers, e.tokens[e.prompt_len:], 1)
        np.add.at(prompts, e.tokens[: e.prompt_len], 1)
    order = np.lexsort((np.arange(vocab_size), -prompts, -answers))  # last key sorts first
    keep = list(dict.fromkeys([int(i) for i in always] + order.tolist()))[:size]
    return np.array(sorted(keep), dtype=np.int64)


def set_draft_vocab(draft: DFlashDraft, ids: np.ndarray) -> None:
    """Point ``draft``'s reduced head at the target ids ``ids`` (sorted): ``d2t[i] = ids[i] - i``."""
    if len(ids) != draft.config.draft_vocab_size:
        raise BlockPilotError(f"{len(ids)} draft-vocabulary ids for draft_vocab_size {draft.config.draft_vocab_size}")
    draft.d2t = mx.array(ids - np.arange(len(ids)), dtype=mx.int64)


def warm_start(draft: DFlashDraft, path) -> int:
    """Start ``draft`` from the weights of the drafter in ``path``; returns how many layers
    were added. Its vocabulary table (``d2t``) is taken when both have a reduced vocabulary of
    the same size (the drafter then proposes from the same tokens), else left alone.

    A source with fewer layers (of the same shape) grows: its layers become ``draft``'s first
    ones and the new last layers keep their initial weights with their output projections
    (``o_proj``, ``down_proj``) zeroed, so each starts as the identity on the residual stream
    and the grown drafter proposes exactly what the source did until training moves it. (Last,
    not first: the residual stream entering the first layer is the token embedding, ~100x
    smaller than after one layer, and a new layer there swamps it within a few steps.)

    A source that taps a subset of ``draft``'s target layers grows the same way: ``fc`` keeps
    the source's columns for the layers both tap and gets zero columns for the new ones."""
    from ..draft import load_draft

    source = load_draft(path)
    extra = draft.config.num_hidden_layers - source.config.num_hidden_layers
    src = dict(tree_flatten(source.parameters()))
    src["fc.weight"] = _grown_fc(src["fc.weight"], source.config.target_layer_ids, draft.config.target_layer_ids, path)
    same_vocab = source.config.draft_vocab_size is not None and source.config.draft_vocab_size == draft.config.draft_vocab_size
    d2t = src.pop("d2t", None)
    mine = dict(tree_flatten(draft.parameters()))
    new = {k for k in mine if k.startswith("layers.") and int(k.split(".")[1]) >= source.config.num_hidden_layers}
    bad = [k for k, v in src.items() if k not in mine or mine[k].shape != v.shape]
    if extra < 0 or bad or set(mine) - set(src) - new - {"d2t"}:
        what = (f"{source.config.num_hidden_layers} layers, more than --layers {draft.config.num_hidden_layers}"
                if extra < 0 else (bad or sorted(set(mine) - set(src) - new))[:3])
        raise BlockPilotError(f"--init-from {path} is a drafter of another shape ({what}...)")
    weights = [(k, v.astype(mx.float32)) for k, v in src.items()]
    weights += [(k, mx.zeros_like(mine[k])) for k in new if k.endswith(("o_proj.weight", "down_proj.weight"))]
    if same_vocab:
        weights.append(("d2t", d2t))
    draft.load_weights(weights, strict=False)
    mx.eval(draft.parameters())
    return max(extra, 0)


def _grown_fc(weight: mx.array, source_ids, ids, path) -> mx.array:
    """``fc.weight`` of a drafter tapping ``source_ids``, as one tapping ``ids`` (a superset):
    the source's columns per shared layer, zeros for the layers it did not tap."""
    if tuple(source_ids) == tuple(ids):
        return weight
    missing = [i for i in source_ids if i not in ids]
    if missing or len(set(ids)) != len(ids):
        raise BlockPilotError(f"--init-from {path} taps target layers {list(source_ids)}; --target-layer-ids "
                              f"{list(ids)} must include all of them (it may add more)")
    width = weight.shape[1] // len(source_ids)
    blocks = {i: weight[:, k * width:(k + 1) * width] for k, i in enumerate(source_ids)}
    zeros = mx.zeros((weight.shape[0], width), dtype=weight.dtype)
    return mx.concatenate([blocks.get(i, zeros) for i in ids], axis=1)


def init_draft(model, cfg: DraftConfig, seed: int = 0) -> DFlashDraft:
    """A drafter whose layers start as copies of the target's last layers and whose
    final norm is the target's (the shared head expects its scale and signs).

    ``fc`` starts by passing the last tapped layer through (plus small noise).
    """
    mx.random.seed(seed)
    draft = DFlashDraft(cfg)
    layers = target.layers(model)
    n = len(layers)
    traditional = getattr(getattr(getattr(layers[-1], "self_attn", None), "rope", None), "traditional", False)
    weights = []
    mine = {k: v.shape for k, v in tree_flatten(draft.layers[0].parameters())}
    for i in range(cfg.num_hidden_layers):
        src = dict(tree_flatten(layers[n - cfg.num_hidden_layers + i].parameters()))
        if any(k.endswith(".scales") for k in src):
            raise BlockPilotError("cannot initialise the drafter from a quantized target; convert it to float")
        # a Llama layer lacks the q/k norms (they keep their init) and Qwen2's attention biases are
        # dropped (the drafter has none); anything else left over means another kind of layer
        theirs = {k: v.shape for k, v in src.items() if not k.startswith("self_attn.rope") and not k.endswith(".bias")}
        odd = sorted(k for k in theirs if k not in mine or theirs[k] != mine[k])
        if odd:
            raise BlockPilotError(
                f"the target's layer {n - cfg.num_hidden_layers + i} ({target.model_type(model)}) is not shaped like a "
                f"drafter layer, so it cannot initialise one ({odd[:3]}...); "
                "train a drafter for a Llama/Mistral/Qwen2/Qwen3-style target")
        for name, value in src.items():
            if name.startswith("self_attn.") and name.split(".")[1] in ("q_proj", "k_proj") and traditional:
                value = target.half_split_rows(value, cfg.head_dim)
            if name.startswith("self_attn.rope"):
                continue
            weights.append((f"layers.{i}.{name}", value.astype(mx.float32)))
    weights.append(("norm.weight", target.final_norm(model).weight.astype(mx.float32)))
    H, k = cfg.hidden_size, len(cfg.target_layer_ids)
    fc = 0.02 * mx.random.normal((H, k * H))
    fc = mx.concatenate([fc[:, : (k - 1) * H], fc[:, (k - 1) * H :] + mx.eye(H)], axis=1)
    weights.append(("fc.weight", fc))
    draft.load_weights(weights, strict=False)
    mx.eval(draft.parameters())
    return draft


# ---------------------------------------------------------------------------
# Soft labels: the target's own distributions over the draft vocabulary


@dataclass
class SoftLabels:
    """The target's ``k`` most likely next tokens after every position of one sequence (rows
    as its features: position ``j`` predicts token ``j + 1``), as draft-vocabulary indices
    ``ids`` ``(len - 1, k)`` with their probabilities ``p`` renormalised over those ``k``."""

    ids: np.ndarray
    p: np.ndarray


def soft_labels(model, examples: Sequence[distill.Example], layer_ids: Sequence[int], head: mx.array, k: int,
                batch_size: int = 16, progress: bool = True) -> List[SoftLabels]:
    """The target's top-``k`` distributions over the rows of ``head`` (the draft vocabulary's
    rows of the output matrix) at every position of ``examples``, computed from the stored
    output of the deepest tapped layer (``target.logits_from_layer``: the layers after it,
    not a whole forward pass). Sequences are right-padded (causal: no real position sees a pad)."""
    from tqdm import tqdm

    deepest = max(layer_ids)
    H = head.shape[1]
    col = list(layer_ids).index(deepest) * H
    k = min(k, head.shape[0])
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].features))
    done: Dict[int, SoftLabels] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="soft labels", disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        longest = max(len(examples[i].features) for i in idx)
        x = np.zeros((len(idx), longest, H), np.float16)
        for r, i in enumerate(idx):
            f = examples[i].features
            x[r, : len(f)] = f[:, col : col + H]
        logits = target.logits_from_layer(model, mx.array(x).astype(mx.float32), deepest, lambda h: h @ head.T)
        top = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        p = mx.softmax(mx.take_along_axis(logits, top, axis=-1), axis=-1)
        top, p = np.array(top.astype(mx.int32)), np.array(p.astype(mx.float16))
        for r, i in enumerate(idx):
            n = len(examples[i].features)
            done[i] = SoftLabels(top[r, :n], p[r, :n])
    return [done[i] for i in range(len(examples))]


def soft_label_agreement(examples: Sequence[distill.Example], soft: Sequence[SoftLabels], to_draft: np.ndarray) -> float:
    """How often the soft labels' most likely token is the sequence's own next answer token
    (among those in the draft vocabulary): ~1 for the target's greedy answers (a check that
    positions and labels line up)."""
    hit = seen = 0
    for e, s in zip(examples, soft):
        nxt = to_draft[e.tokens[e.prompt_len :]]
        best = s.ids[np.arange(e.prompt_len - 1, len(e.tokens) - 1), np.argmax(s.p[e.prompt_len - 1 :], axis=-1)]
        ok = nxt >= 0
        hit += int((best[ok] == nxt[ok]).sum())
        seen += int(ok.sum())
    return hit / max(seen, 1)


# ---------------------------------------------------------------------------
# Batches of blocks


def sample_batch(
    examples: Sequence[distill.Example],
    rows: Sequence[int],
    blocks_per_seq: int,
    block_size: int,
    mask_id: int,
    rng: np.random.Generator,
    anchors: Optional[np.ndarray] = None,
    soft: Optional[Sequence[SoftLabels]] = None,
) -> Dict[str, np.ndarray]:
    """Blocks for the sequences ``rows``: features, block tokens, anchors, labels, valid
    (and with ``soft``, the soft labels of every label: ``soft_ids``, ``soft_p``).

    Anchors are answer positions ``p`` (prompt_len <= p <= len - 2), sampled
    without replacement when the answer is long enough. Only the features of
    positions before the last anchor are kept (nothing after it is visible).
    Labels are the target's greedy tokens (``Example.next_tokens``); block position
    ``k`` counts only while the sequence's tokens ``p+1..p+k-1`` are those too (always,
    in the target's own answers; in written text, only where it agrees with the target),
    so every label is the target's greedy continuation of the block's anchor.
    """
    S, nb, B = len(rows), blocks_per_seq, block_size
    if anchors is None:
        anchors = np.zeros((S, nb), dtype=np.int64)
        for r, i in enumerate(rows):
            e = examples[i]
            cand = np.arange(e.prompt_len, len(e.tokens) - 1)
            anchors[r] = rng.choice(cand, size=nb, replace=len(cand) < nb)
    ctx_len = int(anchors.max())
    F = examples[rows[0]].features.shape[1]
    feats = np.zeros((S, ctx_len, F), dtype=np.float32)
    blocks = np.full((S, nb, B), mask_id, dtype=np.int32)
    labels = np.zeros((S, nb, B - 1), dtype=np.int32)
    valid = np.zeros((S, nb, B - 1), dtype=bool)
    k = np.arange(1, B)
    for r, i in enumerate(rows):
        e = examples[i]
        n = min(ctx_len, e.features.shape[0])
        feats[r, :n] = e.features[:n]
        blocks[r, :, 0] = e.tokens[anchors[r]]
        pos = anchors[r][:, None] + k[None]
        nxt = e.next_tokens()
        last = len(nxt) - 1
        # greedy[j]: the sequence's token j + 1 is the target's greedy token after position j
        greedy = e.tokens[1:] == nxt
        prefix = np.cumprod(greedy[np.minimum(pos[:, :-1] - 1, last)], axis=1).astype(bool)
        ok = (pos < len(e.tokens)) & np.concatenate([np.ones((nb, 1), bool), prefix], axis=1)
        valid[r] = ok
        labels[r] = np.where(ok, nxt[np.minimum(pos - 1, last)], 0)
    out = {"features": feats, "blocks": blocks, "anchors": anchors, "labels": labels, "valid": valid}
    if soft is not None:  # the label at position pos is predicted after position pos - 1
        rows_of = [np.minimum(anchors[r][:, None] + k[None] - 1, len(examples[i].tokens) - 2) for r, i in enumerate(rows)]
        out["soft_ids"] = np.stack([soft[i].ids[j] for i, j in zip(rows, rows_of)])
        out["soft_p"] = np.stack([soft[i].p[j] for i, j in zip(rows, rows_of)]).astype(np.float32)
    return out


def split_validation(sets: Sequence[Sequence[distill.Example]], count: int):
    """(training, validation) sequences of the data ``sets``: ``count`` validation sequences spread
    evenly over the first set (its short and long prompts alike), so adding sets after it keeps
    the same validation sequences, out of training."""
    if not count:
        return [e for one in sets for e in one], []
    if count >= len(sets[0]):
        raise BlockPilotError(f"--val-sequences {count} leaves no sequence of the first data set to train on")
    picked = set(np.linspace(0, len(sets[0]) - 1, count).round().astype(int).tolist())
    val = [e for i, e in enumerate(sets[0]) if i in picked]
    return [e for i, e in enumerate(sets[0]) if i not in picked] + [e for one in sets[1:] for e in one], val


def block_hidden(draft: DFlashDraft, model, batch: Dict[str, np.ndarray]) -> mx.array:
    """Normalised drafter hidden states of every block position ``(S, nb*B, H)``."""
    S, nb, B = batch["blocks"].shape
    blocks = draft.embed(model, mx.array(batch["blocks"].reshape(S, nb * B)))
    return draft(blocks, mx.array(batch["features"]), anchors=batch["anchors"])


def loss_weights(block_size: int, gamma: float) -> np.ndarray:
    return np.exp(-(np.arange(1, block_size) - 1) / gamma).astype(np.float32)


def prepare_loss(batch, gamma: float, vocab_size: int, vocab_sample: int, rng: np.random.Generator,
                 to_draft: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Flat loss targets of the valid block positions and the softmax's vocabulary.

    With a reduced draft vocabulary, ``to_draft`` maps target ids to draft ids (-1: not in
    it) and positions whose label the drafter cannot propose leave the loss. Otherwise,
    with ``vocab_sample`` > 0 the candidates are the batch's label tokens plus uniformly
    sampled others (their logits get ``log(rest / sampled)``).
    """
    S, nb, B = batch["blocks"].shape
    valid = batch["valid"]
    if to_draft is not None:
        valid = valid & (to_draft[batch["labels"]] >= 0)
        vocab_sample = 0
    flat = np.flatnonzero(np.concatenate([np.zeros((S, nb, 1), bool), valid], axis=-1).reshape(-1))
    labels = batch["labels"][valid]
    w = np.broadcast_to(loss_weights(B, gamma), valid.shape)[valid]
    out = {"positions": mx.array(flat.astype(np.int32)), "weights": mx.array(w)}
    if "soft_ids" in batch:
        if to_draft is None and 0 < vocab_sample < vocab_size:
            raise BlockPilotError("soft labels need a reduced draft vocabulary (--draft-vocab) or the full softmax (--vocab-sample 0)")
        out["soft_ids"] = mx.array(batch["soft_ids"][valid].astype(np.int32))
        out["soft_p"] = mx.array(batch["soft_p"][valid])
    if vocab_sample <= 0 or vocab_sample >= vocab_size:
        out["labels"] = mx.array(labels if to_draft is None else to_draft[labels].astype(np.int32))
        return out
    pos = np.unique(labels)
    k = max(vocab_sample - len(pos), 1)
    rest = vocab_size - len(pos)
    neg = rng.choice(rest, size=min(k, rest), replace=False)
    neg = np.setdiff1d(np.arange(vocab_size), pos, assume_unique=True)[neg] if rest > 0 else neg[:0]
    cand = np.concatenate([pos, np.sort(neg)])
    corr = np.concatenate([np.zeros(len(pos), np.float32), np.full(len(neg), math.log(rest / max(len(neg), 1)), np.float32)])
    out["labels"] = mx.array(np.searchsorted(pos, labels).astype(np.int32))
    out["candidates"] = mx.array(cand.astype(np.int32))
    out["correction"] = mx.array(corr)
    return out


def block_loss(draft: DFlashDraft, model, batch, targets, head: Optional[mx.array], soft_weight: float = 0.0) -> mx.array:
    """Weighted cross-entropy over the valid block positions 1..B-1.

    ``head`` is the output matrix the labels index (the target's, or its draft-vocabulary
    rows); None uses the target's head as it is (quantized, say). With soft labels in
    ``targets``, the loss per position is ``(1 - soft_weight)`` times the cross-entropy
    against the target's token plus ``soft_weight`` times the cross-entropy against the
    target's top-k distribution there (knowledge distillation)."""
    h = block_hidden(draft, model, batch)
    h = h.reshape(-1, h.shape[-1])[targets["positions"]]
    if head is None:
        logits = draft.head(model, h)
    elif "candidates" in targets:
        # the sampled-softmax log-count correction applies to the final logits (after any soft-cap)
        logits = draft.finish_logits(h @ head[targets["candidates"]].T) + targets["correction"]
    else:
        logits = draft.finish_logits(h @ head.T)
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    ce = lse - mx.take_along_axis(logits, targets["labels"][:, None], axis=-1)[:, 0]
    if "soft_ids" in targets and soft_weight:
        soft = lse - (targets["soft_p"] * mx.take_along_axis(logits, targets["soft_ids"], axis=-1)).sum(-1)
        ce = (1 - soft_weight) * ce + soft_weight * soft
    w = targets["weights"]
    return (ce * w).sum() / w.sum()


# ---------------------------------------------------------------------------
# Held-out acceptance, checkpoints, log


def teacher_forced_acceptance(draft: DFlashDraft, model, examples: Sequence[distill.Example], block_size: int,
                              head: Optional[mx.array], scale: np.ndarray) -> Dict[str, Any]:
    """Greedy decoding's acceptance, replayed on distilled sequences without the target.

    A block is drafted at every answer position at once (teacher forcing; the sequences are
    the target's own greedy answers, so the context is what decoding would see). Then the
    rounds of real decoding are chained: the first starts at the first answer token, each
    keeps its drafts up to the first wrong one plus the target's token, and the next starts
    there. ``mean`` is their mean length, as decoding reports it (an average over every
    position instead over-weights easy stretches, which a real round crosses in one go);
    ``position_hit_rate`` is each block position's hit rate given the ones before it hit.
    """
    rounds, hits, seen = [], np.zeros(block_size - 1), np.zeros(block_size - 1)
    ids = draft.draft_ids()
    ids = np.array(ids) if ids is not None else None
    for e in examples:
        anchors = np.arange(e.prompt_len, len(e.tokens) - 1)[None]
        if anchors.size == 0:
            continue
        batch = sample_batch([e], [0], anchors.shape[1], block_size, draft.config.mask_token_id, None, anchors=anchors)
        batch["features"] *= scale
        h = block_hidden(draft, model, batch)[0].reshape(anchors.shape[1], block_size, -1)[:, 1:]
        logits = draft.head(model, h) if head is None else draft.finish_logits(h @ head.T)
        guess = np.array(mx.argmax(logits, axis=-1))
        guess = ids[guess] if ids is not None else guess
        run = np.cumprod((guess == batch["labels"][0]) & batch["valid"][0], axis=1)
        hits += run.sum(0)
        seen += np.concatenate([np.ones((len(run), 1)), run[:, :-1]], axis=1).sum(0)
        a = 0  # rounds of decoding: anchor index into this sequence's answer
        while a < len(run):
            n = 1 + int(run[a].sum())
            rounds.append(min(n, len(run) - a))
            a += n
    return {"mean": float(np.mean(rounds)) if rounds else 0.0,
            "position_hit_rate": [float(h / s) if s else 0.0 for h, s in zip(hits, seen)]}


def acceptance(model, draft, tokenizer, prompts: Sequence[List[int]], block_size: int, max_tokens: int) -> float:
    """Pooled mean acceptance length (tokens per target forward) of greedy decoding."""
    lengths: List[int] = []
    for p in prompts:
        r = decode.generate(model, draft, tokenizer, p, block_size=block_size, max_tokens=max_tokens)
        lengths += r.acceptance_lengths
    return sum(lengths) / len(lengths) if lengths else 0.0


def feature_scale(examples: Sequence[distill.Example], limit: int = 256) -> mx.array:
    """RMS of every context-feature column over the first ``limit`` sequences.

    The tapped layers carry a few massive activations (SmolLM2: one dimension near
    2,000 where the median is ~10). Training ``fc`` on features divided by this scale
    (and saving ``fc.weight / scale``) gives every column the same footing under Adam;
    the saved drafter computes exactly the same function.
    """
    sq = np.zeros(examples[0].features.shape[1], np.float64)
    n = 0
    for e in examples[:limit]:
        sq += (e.features.astype(np.float64) ** 2).sum(0)
        n += len(e.features)
    return mx.array(np.maximum(np.sqrt(sq / max(n, 1)), 1e-3).astype(np.float32))


def unscaled(draft: DFlashDraft, scale: mx.array) -> DFlashDraft:
    """The drafter trained on features / ``scale``, as one that reads raw features."""
    plain = DFlashDraft(draft.config)
    weights = dict(tree_flatten(draft.parameters()))
    weights["fc.weight"] = weights["fc.weight"] / scale
    plain.load_weights(list(weights.items()), strict=True)
    mx.eval(plain.parameters())
    return plain


def save_checkpoint(out: Path, draft, opt, step: int, scale: mx.array, cpu_s: float = 0.0) -> None:
    ck = out / CHECKPOINT
    ck.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(ck / "draft.safetensors"), dict(tree_flatten(draft.parameters())))
    mx.save_safetensors(str(ck / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    mx.save_safetensors(str(ck / "feature_scale.safetensors"), {"scale": scale})
    (ck / "state.json").write_text(json.dumps({"step": step, "train_cpu_s": cpu_s}))
    save_draft(unscaled(draft, scale), out)


def checkpoint_state(out: Path) -> Dict[str, Any]:
    """``{"step", "train_cpu_s"}`` of the checkpoint in ``out`` (for a resumed run)."""
    return json.loads((Path(out) / CHECKPOINT / "state.json").read_text())


def load_checkpoint(out: Path, draft, opt):
    """Restore ``draft`` and ``opt``; returns (step, feature scale)."""
    ck = out / CHECKPOINT
    if not (ck / "state.json").is_file():
        raise BlockPilotError(f"no checkpoint in {ck} to resume from; drop --resume")
    if not (ck / "feature_scale.safetensors").is_file():
        raise BlockPilotError(f"checkpoint {ck} was written by an older mlx_blockpilot; start again without --resume")
    draft.load_weights(list(mx.load(str(ck / "draft.safetensors")).items()), strict=True)
    opt.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
    scale = mx.load(str(ck / "feature_scale.safetensors"))["scale"]
    mx.eval(draft.parameters(), opt.state)
    return json.loads((ck / "state.json").read_text())["step"], scale


def read_log(path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_log(records: Sequence[Dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "acceptance" in r]
    vals = [r for r in records if "val_acceptance" in r]
    fig, (ax, ax3) = plt.subplots(1, 2, figsize=(12, 4))
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="weighted CE (train)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.set_title("training loss")
    for recs, key, style, label in ((evals, "acceptance", "o-", "held-out prompts, real decoding"),
                                    (vals, "val_acceptance", "s--", "held-out sequences, teacher-forced")):
        pts = [(r["train_cpu_h"], r[key]) for r in recs if "train_cpu_h" in r]
        if pts:
            ax3.plot(*zip(*pts), style, label=label)
    ax3.set_xlabel("training CPU hours (all cores of the process)")
    ax3.set_ylabel("mean acceptance length")
    ax3.set_title("held-out acceptance against CPU hours")
    if evals or vals:
        ax3.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The loop


def train(
    model,
    tokenizer,
    draft: DFlashDraft,
    examples: Sequence[distill.Example],
    out,
    steps: int,
    batch_size: int = 4,
    blocks_per_seq: int = 8,
    lr: float = 6e-4,
    warmup: int = 20,
    gamma: Optional[float] = None,
    vocab_sample: int = 8192,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 100,
    eval_prompts: Sequence[List[int]] = (),
    eval_every: int = 100,
    eval_tokens: int = 64,
    progress: bool = True,
    stop_after: Optional[int] = None,
    val_examples: Sequence[distill.Example] = (),
    eval_block_size: Optional[int] = None,
    weight_decay: float = 0.01,
    soft_k: int = 0,
    soft_weight: float = 0.5,
) -> List[Dict[str, Any]]:
    """Train ``draft`` in place (``fc`` preconditioned by ``feature_scale`` while
    training, plain again at the end); returns the log records. Step ``s`` draws its batch
    from a generator seeded with ``(seed, s)``, so a resumed run repeats the same batches.
    ``stop_after`` ends this run early at that step (checkpointed; the schedule stays
    the one for ``steps``), for splitting a run across sessions with ``resume``.
    Every ``eval_every`` steps the log gets the teacher-forced acceptance on
    ``val_examples`` and real greedy decoding's on ``eval_prompts`` (at ``eval_block_size``,
    default the training size), each with the CPU hours spent so far (training steps and
    these evaluations: what the run cost). ``soft_k`` > 0 adds soft labels: the target's
    top-``soft_k`` distribution at every label, weighted ``soft_weight`` in the loss."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = draft.config
    B = cfg.block_size
    eval_B = eval_block_size or B
    gamma = gamma if gamma is not None else max(1.0, B / 2 - 1)
    usable = [i for i, e in enumerate(examples) if e.answer_len >= 2]
    if not usable:
        raise BlockPilotError("no training sequence has an answer of 2 or more tokens")
    warm = min(warmup, max(steps - 1, 0))
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr * 0.01, lr, max(warm, 1)), optim.cosine_decay(lr, max(steps - warm, 1), lr * 0.1)],
        [max(warm, 1)],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    opt.init(draft.trainable_parameters())
    cpu_s = 0.0
    if resume:
        start, scale = load_checkpoint(out, draft, opt)  # restores the vocabulary table (d2t) too
        cpu_s = checkpoint_state(out).get("train_cpu_s", 0.0)
    else:
        start, scale = 0, feature_scale(examples)
        draft.fc.weight = draft.fc.weight * scale
    head, to_draft = target.head_weight(model), None
    if cfg.draft_vocab_size is not None:
        if head is None:
            raise BlockPilotError("a reduced draft vocabulary needs a float target head; convert the target to float")
        ids = np.array(draft.draft_ids())
        head = head[mx.array(ids)]
        to_draft = np.full(cfg.vocab_size, -1, np.int64)
        to_draft[ids] = np.arange(len(ids))
    inv_scale = np.array(1.0 / scale)
    log_path = out / LOG
    records = [r for r in read_log(log_path) if r["step"] <= start] if resume else []
    soft = None
    if soft_k:
        if head is None:
            raise BlockPilotError("soft labels need a float target head; convert the target to float")
        soft = soft_labels(model, examples, cfg.target_layer_ids, head, soft_k, progress=progress)
        agree = soft_label_agreement(examples, soft, to_draft if to_draft is not None else np.arange(cfg.vocab_size))
        records.append({"step": start, "soft_labels": soft_k, "soft_weight": soft_weight, "soft_label_agreement": agree})
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    loss_and_grad = nn.value_and_grad(draft, lambda d, b, t: block_loss(d, model, b, t, head, soft_weight))
    last = min(steps, stop_after) if stop_after else steps
    bar = tqdm(range(start + 1, last + 1), initial=start, total=steps, disable=not progress, desc="train")
    acc = next((r["acceptance"] for r in reversed(records) if "acceptance" in r), None)
    with log_path.open("a") as log:
        if val_examples and not resume:  # where the curve starts
            tf = teacher_forced_acceptance(draft, model, val_examples, eval_B, head, inv_scale)
            rec = {"step": 0, "block_size": eval_B, "train_cpu_h": 0.0, "val_acceptance": tf["mean"],
                   "val_position_hit_rate": tf["position_hit_rate"]}
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
        for step in bar:
            cpu0 = time.process_time()
            rng = np.random.default_rng([seed, step])
            rows = rng.choice(usable, size=batch_size, replace=len(usable) < batch_size)
            batch = sample_batch(examples, rows, blocks_per_seq, B, cfg.mask_token_id, rng, soft=soft)
            batch["features"] *= inv_scale
            targets = prepare_loss(batch, gamma, cfg.vocab_size, vocab_sample if head is not None else 0, rng, to_draft)
            tic = time.perf_counter()
            loss, grads = loss_and_grad(draft, batch, targets)
            opt.update(draft, grads)
            mx.eval(loss, draft.parameters(), opt.state)
            rec = {"step": step, "loss": loss.item(), "lr": float(schedule(mx.array(step - 1))), "s": time.perf_counter() - tic}
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            loss_value = rec["loss"]
            if (eval_prompts or val_examples) and (step % eval_every == 0 or step == last):
                rec = {"step": step, "block_size": eval_B, "train_cpu_h": (cpu_s + time.process_time() - cpu0) / 3600}
                if val_examples:
                    tf = teacher_forced_acceptance(draft, model, val_examples, eval_B, head, inv_scale)
                    rec["val_acceptance"], rec["val_position_hit_rate"] = tf["mean"], tf["position_hit_rate"]
                if eval_prompts:
                    acc = rec["acceptance"] = acceptance(model, unscaled(draft, scale), tokenizer, eval_prompts, eval_B, eval_tokens)
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
            log.flush()
            cpu_s += time.process_time() - cpu0
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.2f}" if acc is not None else "-")
            if step % checkpoint_every == 0 or step == last:
                save_checkpoint(out, draft, opt, step, scale, cpu_s)
    draft.fc.weight = draft.fc.weight / scale
    mx.eval(draft.parameters())
    save_draft(draft, out)
    plot_log(records, out / "loss.png")
    return records


# ---------------------------------------------------------------------------
# CLI


def resolve_target(src, out: Path):
    """(model, tokenizer, target dir) for a bundle, an mlx-lm directory or a GGUF file
    (converted once to float32 into ``out/target``)."""
    from ..bundle import MANIFEST, load_target

    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        dest = out / "target"
        if not (dest / "config.json").is_file():
            from ..converters.gguf import convert_gguf

            dest.mkdir(parents=True, exist_ok=True)
            convert_gguf(src, dest, dtype="float32", dequantize=True)
        src = dest
    elif (src / MANIFEST).is_file():
        src = src / "target"
    model, tokenizer = load_target(src)
    return model, tokenizer, src
