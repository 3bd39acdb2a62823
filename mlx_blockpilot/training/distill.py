"""Self-distillation data for drafter training: the target's greedy answers and features.

The target answers each prompt greedily in batches (left-padded, mlx-lm
``BatchKVCache``). The same forward passes that pick the tokens also hand back
the outputs of the tapped layers (``target.forward``), so the context features
of prompt + answer are captured while generating, never by a second pass.

On disk (``DIR``): ``shard_NNNNN.safetensors`` with ``tokens`` (int32, all
sequences concatenated), ``features`` (float16, one row per token except each
sequence's last, which the target never had to read), ``offsets`` (int64, the
sequences' token starts, plus the total) and ``prompt_lens`` (int32); and
``data.json`` with the tapped layer ids and the prompt indices done. A token file keeps the
sequences alone (``write_token_file``); ``featurize`` rebuilds their features.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from .. import target
from ..errors import BlockPilotError

META = "data.json"


@dataclass
class Example:
    """One training sequence: ``tokens`` = prompt + answer, ``features`` for tokens[:-1];
    ``labels``: the target's greedy token after each of those positions (None: the next
    token itself, as in the target's own greedy answers)."""

    tokens: np.ndarray
    prompt_len: int
    features: np.ndarray
    labels: Optional[np.ndarray] = None

    @property
    def answer_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    def next_tokens(self) -> np.ndarray:
        """The target's greedy token after each position but the last."""
        return self.tokens[1:] if self.labels is None else self.labels


def greedy_batch(
    model,
    prompts: Sequence[List[int]],
    layer_ids: Sequence[int],
    max_new_tokens: int,
    eos: Sequence[int] = (),
    pad_id: int = 0,
) -> List[Example]:
    """Answer ``prompts`` greedily in one batch; returns them in the input order.

    Answers stop after an EOS token (kept) or ``max_new_tokens`` tokens. Finished
    rows leave the batch so the rest decode narrower.
    """
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    x = mx.array([[pad_id] * k + list(p) for k, p in zip(pads, prompts)], dtype=mx.int32)
    cache = [BatchKVCache(pads) for _ in range(target.num_layers(model))]
    logits, hidden = target.forward(model, x, cache, layer_ids)
    tok = mx.argmax(logits[:, -1], axis=-1)
    hidden = hidden.astype(mx.float16)
    mx.eval(tok, hidden)
    h = np.array(hidden)
    feats = [[h[i, pads[i]:]] for i in range(n)]
    answers: List[List[int]] = [[] for _ in range(n)]
    rows = list(range(n))  # batch row -> prompt index
    eos = set(eos)
    while True:
        toks = tok.tolist()
        keep = []
        for r, t in enumerate(toks):
            i = rows[r]
            answers[i].append(t)
            if t not in eos and len(answers[i]) < max_new_tokens:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(rows):
            idx = mx.array(keep)
            for c in cache:
                c.filter(idx)
            tok = tok[idx]
            rows = [rows[r] for r in keep]
        logits, hidden = target.forward(model, tok[:, None], cache, layer_ids)
        tok = mx.argmax(logits[:, -1], axis=-1)
        hidden = hidden[:, 0].astype(mx.float16)
        mx.eval(tok, hidden)
        h = np.array(hidden)
        for r, i in enumerate(rows):
            feats[i].append(h[r : r + 1])
    out = []
    for i, p in enumerate(prompts):
        tokens = np.array(list(p) + answers[i], dtype=np.int32)
        f = np.concatenate(feats[i], axis=0)
        assert f.shape[0] == len(tokens) - 1
        out.append(Example(tokens, len(p), f))
    return out


def read_meta(root) -> Optional[dict]:
    path = Path(root) / META
    return json.loads(path.read_text()) if path.is_file() else None


def distill(
    model,
    prompts: Sequence[List[int]],
    root,
    layer_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 16,
    eos: Sequence[int] = (),
    pad_id: int = 0,
) -> Iterator[dict]:
    """Generate shards into ``root`` for the prompts not done yet; yields per-shard stats.

    Prompts are batched by length (less padding). Rerunning continues where a
    previous run stopped; the tapped layers must be the same.
    """
    root, meta, todo = _start(root, layer_ids, [len(p) for p in prompts])
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        seqs = greedy_batch(model, [prompts[i] for i in idx], layer_ids, max_new_tokens, eos, pad_id)
        _add_shard(root, meta, idx, seqs)
        yield {
            "prompts": len(idx),
            "tokens": int(sum(len(s.tokens) for s in seqs)),
            "answer_tokens": int(sum(s.answer_len for s in seqs)),
        }


def _start(root, layer_ids: Sequence[int], lengths: Sequence[int]):
    """(root, meta, indices still to do, shortest first) of a data folder, made if new."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lengths = [int(n) for n in lengths]
    meta = read_meta(root) or {"target_layer_ids": list(layer_ids), "done": [], "shards": []}
    if meta["target_layer_ids"] != list(layer_ids):
        raise BlockPilotError(
            f"data in {root} was captured at target layers {meta['target_layer_ids']}, not {list(layer_ids)}; "
            "use another --out or the same --target-layer-ids"
        )
    # "done" holds indices into the inputs: they only mean something for the same inputs (a longer
    # list that starts with them is fine: a run resumed with a larger --limit)
    known = meta.get("lengths", lengths)
    if known[: len(lengths)] != lengths[: len(known)]:
        raise BlockPilotError(f"data in {root} was made from other prompts or sequences; use another --out "
                              "(or the same --prompts and token file as the run that made it)")
    meta["lengths"] = lengths if len(lengths) >= len(known) else known
    done = set(meta["done"])
    return root, meta, sorted((i for i in range(len(lengths)) if i not in done), key=lambda i: lengths[i])


def _add_shard(root: Path, meta: dict, indices: Sequence[int], seqs: Sequence[Example]) -> None:
    """Write one shard and record it (and the indices it holds) in the folder's ``data.json``."""
    name = f"shard_{len(meta['shards']):05d}.safetensors"
    write_shard(root / name, seqs)
    meta["shards"].append(name)
    meta["done"].extend(indices)
    tmp = root / f".{META}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, root / META)


def write_shard(path, seqs: Sequence[Example]) -> None:
    from safetensors.numpy import save_file

    offsets = np.cumsum([0] + [len(s.tokens) for s in seqs]).astype(np.int64)
    tensors = {
        "tokens": np.concatenate([s.tokens for s in seqs]).astype(np.int32),
        "features": np.concatenate([s.features for s in seqs]).astype(np.float16),
        "offsets": offsets,
        "prompt_lens": np.array([s.prompt_len for s in seqs], dtype=np.int32),
    }
    if all(s.labels is not None for s in seqs):
        tensors["labels"] = np.concatenate([s.labels for s in seqs]).astype(np.int32)
    save_file(tensors, str(path))


SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "U16": np.uint16}


def map_tensors(path) -> dict:
    """The tensors of a safetensors file as read-only memory maps: nothing is read until used,
    so data sets larger than memory train from the disk (and the page cache)."""
    path = Path(path)
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(t["dtype"])
        if dtype is None:
            raise BlockPilotError(f"{path}: tensor {name} has dtype {t['dtype']}, not one distilled data uses")
        count = int(np.prod(t["shape"])) if t["shape"] else 1
        if end == begin:
            out[name] = np.zeros(t["shape"], dtype)
            continue
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=(count,)).reshape(t["shape"])
    return out


def load_data(root) -> List[Example]:
    """All distilled sequences in ``root`` (shard order); features stay on disk (memory maps)."""
    meta = read_meta(root)
    if meta is None:
        raise BlockPilotError(f"no distilled data in {root} (no {META})")
    out = []
    for name in meta["shards"]:
        d = map_tensors(Path(root) / name)
        off, feat_off = np.array(d["offsets"]), 0
        tokens_all, labels_all = np.array(d["tokens"]), np.array(d["labels"]) if "labels" in d else None
        for k, plen in enumerate(np.array(d["prompt_lens"])):
            tokens = tokens_all[off[k] : off[k + 1]]
            n = len(tokens) - 1
            labels = None if labels_all is None else labels_all[feat_off : feat_off + n]
            out.append(Example(tokens, int(plen), d["features"][feat_off : feat_off + n], labels))
            feat_off += n
    return out


# ---------------------------------------------------------------------------
# Token files: the distilled sequences without features, small enough to keep in a
# repository; ``featurize`` rebuilds the features from them with batched prefill.


def write_token_file(examples: Sequence[Example], path, info: Optional[dict] = None) -> None:
    """Save the sequences' token ids (uint16 when they fit) and prompt lengths to ``path``
    (written beside it, then renamed: never half-written)."""
    from safetensors.numpy import save_file

    if not examples:
        raise BlockPilotError(f"no distilled sequences to write to {path}")
    tokens = np.concatenate([e.tokens for e in examples])
    dtype = np.uint16 if tokens.max() < 2**16 else np.int32
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(
            {
                "tokens": tokens.astype(dtype),
                "offsets": np.cumsum([0] + [len(e.tokens) for e in examples]).astype(np.int64),
                "prompt_lens": np.array([e.prompt_len for e in examples], dtype=np.int32),
            },
            str(tmp),
            metadata={"info": json.dumps(info or {})},
        )
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BlockPilotError(f"cannot write the token file {path} ({e.strerror or e})") from None


def read_token_file(path) -> List[Example]:
    """The sequences of a token file (``features`` left empty)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        d = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise BlockPilotError(f"cannot read token file {path}: {e}") from None
    if not {"tokens", "offsets", "prompt_lens"} <= set(d):
        raise BlockPilotError(f"{path} is not a token file (it needs tokens, offsets and prompt_lens)")
    off = d["offsets"]
    empty = np.zeros((0, 0), np.float16)
    return [Example(d["tokens"][off[k] : off[k + 1]].astype(np.int32), int(p), empty) for k, p in enumerate(d["prompt_lens"])]


def featurize(
    model,
    sequences: Sequence[Example],
    root,
    layer_ids: Sequence[int],
    batch_size: int = 16,
) -> Iterator[dict]:
    """Rebuild the features of known sequences into shards in ``root`` (as ``distill`` writes
    them), one teacher-forced forward pass per batch; resumable like ``distill``.

    Sequences are right-padded: under the causal mask no real position sees a pad, so the
    features are those the target computed while generating the sequence. The target's
    greedy token after every position is kept too (``labels``): for its own answers it is
    the next token; for written text (``text_sequences``) it is what training must predict.
    """
    root, meta, todo = _start(root, layer_ids, [len(s.tokens) for s in sequences])
    n_layers = target.num_layers(model)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        seqs = [sequences[i] for i in idx]
        longest = max(len(s.tokens) for s in seqs) - 1
        x = np.zeros((len(seqs), longest), np.int32)
        for r, s in enumerate(seqs):
            x[r, : len(s.tokens) - 1] = s.tokens[:-1]
        logits, hidden = target.forward(model, mx.array(x), [None] * n_layers, layer_ids)
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        hidden = hidden.astype(mx.float16)
        mx.eval(greedy, hidden)
        hidden, greedy = np.array(hidden), np.array(greedy)
        _add_shard(root, meta, idx, [Example(s.tokens, s.prompt_len, hidden[r, : len(s.tokens) - 1],
                                             greedy[r, : len(s.tokens) - 1]) for r, s in enumerate(seqs)])
        yield {"prompts": len(idx), "tokens": int(sum(len(s.tokens) for s in seqs)),
               "answer_tokens": int(sum(s.answer_len for s in seqs))}


def text_sequences(tokenizer, exchanges: Sequence[Tuple[str, str]], max_prompt_tokens: int = 256,
                   max_tokens: int = 512, skip: Sequence[str] = ()) -> List[Example]:
    """Written (prompt, answer) exchanges as training sequences (``features`` left empty): the
    prompt under the chat template as decoding sees it, then the answer's tokens, cut at
    ``max_tokens`` in all. Trained teacher-forced: the labels are the target's own greedy tokens
    (``featurize`` computes them), and a block's deeper positions count only while the text
    agrees with them. Prompts in ``skip`` (held-out ones), longer than ``max_prompt_tokens``
    or whose answer does not extend the prompt's tokens are left out."""
    from ..prompts import encode_chat

    skip = {t.strip() for t in skip}
    empty = np.zeros((0, 0), np.float16)
    out = []
    for prompt, answer in exchanges:
        if prompt.strip() in skip or not prompt.strip() or not answer.strip():
            continue
        head = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        if len(head) > max_prompt_tokens or len(head) + 2 > max_tokens:
            continue
        full = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": answer}]))
        if full[: len(head)] != head or len(full) < len(head) + 2:
            continue
        out.append(Example(np.array(full[:max_tokens], np.int32), len(head), empty))
    return out
