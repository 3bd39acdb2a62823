"""``python -m mlx_blockpilot.sweep``: decode every prompt at every candidate block size.

The result is the training data of a BlockPilot policy: per (prompt, block size)
the mean acceptance length, rounds, tokens and decode tokens/s; per prompt the
prefill features the policy reads at inference.

Layout: ``OUT.jsonl`` holds one ``meta`` line, one ``prompt`` line per prompt
(written once its features are saved) and one ``run`` line per (prompt, block
size). Features go to ``OUT.features/<prompt id>.safetensors`` (float16):
``logits`` (the target's logits at the last prompt token, as the engine hands
them to the policy) and optionally ``hidden`` (the target's hidden state at the
last prompt token, output of the deepest layer the drafter taps). A restarted
sweep skips the pairs already in the file.

Each prompt is prefilled once with the engine's own prefill: the features come
from that pass, and every block size decodes from its KV cache (the engine
re-runs only the last prompt token, exactly as a fresh generation does), so no
extra target pass is spent on features and decoding is unchanged. At T=0 every
size must give the same output: compare ``output_sha1`` across a prompt's runs.
With ``--refine`` each run starts at its size and refines it per round.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from . import decode, target
from .errors import BlockPilotError
from .generate import add_model_args, load_from_args
from .prompts import load_prompts

FEATURES = ("logits", "hidden")
# Settings that must agree between a sweep file and a run that resumes it.
META_KEYS = ("temperature", "max_tokens", "seed", "chat", "refine", "vocab_size", "hidden_size", "feature_layer", "features")


def parse_block_sizes(spec: str) -> List[int]:
    """``"12-20"``, ``"8,12-14,16"`` -> sorted unique sizes (each >= 1)."""
    sizes = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                sizes.update(range(lo, hi + 1))
            else:
                sizes.add(int(part))
        except ValueError:
            raise BlockPilotError(f"block sizes must look like 12-20 or 8,12-14,16, got {spec!r}") from None
    if not sizes or min(sizes) < 1:
        raise BlockPilotError(f"block sizes must be integers >= 1, got {spec!r}")
    return sorted(sizes)


def parse_features(spec: str) -> List[str]:
    names = [f.strip() for f in str(spec).split(",") if f.strip()]
    bad = [f for f in names if f not in FEATURES]
    if bad or "logits" not in names:
        raise BlockPilotError(f"--features must be 'logits' or 'logits,hidden', got {spec!r}")
    return [f for f in FEATURES if f in names]


def prompt_id(tokens: Sequence[int]) -> str:
    return hashlib.sha1(json.dumps(list(tokens)).encode()).hexdigest()[:16]


def features_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".features")


def read_sweep(path) -> Tuple[Optional[Dict[str, Any]], Dict[str, Dict], Dict[Tuple[str, int], Dict]]:
    """(meta, prompts by id, runs by (prompt id, block size)) of a sweep file.

    A last line cut short by an interruption is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise BlockPilotError(f"sweep file {path} does not exist")
    meta, prompts, runs = None, {}, {}
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # interrupted while writing
            raise BlockPilotError(f"line {i + 1} of {path} is not valid JSON; is this a sweep file?") from None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind == "meta":
            meta = rec
        elif kind == "prompt":
            prompts[rec["id"]] = rec
        elif kind == "run":
            runs[(rec["prompt_id"], rec["block_size"])] = rec
        else:
            raise BlockPilotError(f"line {i + 1} of {path} is not a sweep record; is this a sweep file?")
    if meta is None and (prompts or runs):
        raise BlockPilotError(f"{path} has no meta line; is this a sweep file?")
    return meta, prompts, runs


def load_features(path, prompt: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The saved features of one ``prompt`` record of the sweep file at ``path``."""
    f = Path(path).parent / prompt["features"]
    if not f.is_file():
        raise BlockPilotError(f"features file {f} of prompt {prompt['id']} is missing; re-run the sweep")
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()}


def feature_layer(draft) -> int:
    return max(draft.config.target_layer_ids)


def prefill(model, draft, tokens: List[int], features: Sequence[str]):
    """One engine prefill of ``tokens``: (cache, prompt hidden states, features, seconds)."""
    ids = list(draft.config.target_layer_ids)
    cache = decode.make_cache(model, draft)
    tic = time.perf_counter()
    logits = decode._prefill(model, tokens, cache, ids, 2048)
    mx.eval(logits, cache.pending)
    seconds = time.perf_counter() - tic
    feats = {"logits": logits.astype(mx.float16)}
    if "hidden" in features:
        feats["hidden"] = decode.policy_features(model, draft, logits, cache.pending, "hidden").astype(mx.float16)
    mx.eval(feats)
    return cache, cache.pending, feats, seconds


def rewind(cache: decode.PromptCache, draft, tokens: List[int], hidden: mx.array) -> None:
    """Put ``cache`` back to the state right after the prefill of ``tokens``, with a fresh drafter."""
    for c in cache.target:
        c.trim(c.offset - len(tokens))
    cache.tokens = list(tokens)
    cache.draft = draft.make_cache()
    cache.pending = hidden


def _append(f, rec: Dict[str, Any]) -> None:
    f.write(json.dumps(rec) + "\n")
    f.flush()


def _open_for_append(out: Path):
    """Open ``out`` for appending, dropping a last line cut short by an interruption."""
    if out.exists():
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(out, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(out, "a", encoding="utf-8")


def sweep(
    model,
    draft,
    tokenizer,
    prompts: Sequence[str],
    block_sizes: Sequence[int],
    out,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    features: Sequence[str] = ("logits",),
    chat: bool = True,
    refine: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run (or resume) a sweep into ``out``; returns counts of what was done."""
    from tqdm import tqdm

    out = Path(out)
    if not out.parent.is_dir():
        raise BlockPilotError(f"output directory {out.parent} does not exist")
    if max_tokens < 2:
        raise BlockPilotError(f"--max-tokens must be >= 2 for acceptance to mean anything, got {max_tokens}")
    meta = {
        "kind": "meta",
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
        "seed": int(seed),
        "chat": bool(chat and getattr(tokenizer, "has_chat_template", False)),
        "refine": bool(refine),
        "vocab_size": target.vocab_size(model),
        "hidden_size": target.hidden_size(model),
        "feature_layer": feature_layer(draft),
        "features": list(features),
        "target_layer_ids": list(draft.config.target_layer_ids),
    }
    old_meta, done_prompts, done_runs = read_sweep(out) if out.exists() else (None, {}, {})
    if old_meta is not None:
        diff = [k for k in META_KEYS if old_meta.get(k) != meta[k]]
        if diff:
            raise BlockPilotError(
                f"{out} was made with different settings ({', '.join(f'{k}={old_meta.get(k)!r}' for k in diff)}); "
                "resume with the same settings or write to a new --out"
            )

    encoded = []
    for text in prompts:
        toks = (
            list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
            if meta["chat"]
            else list(tokenizer.encode(text))
        )
        encoded.append((prompt_id(toks), text, toks))
    context = target.max_context(model)
    too_long = [i for i, (_, _, t) in enumerate(encoded) if context is not None and len(t) + max_tokens > context]
    encoded = [e for i, e in enumerate(encoded) if i not in set(too_long)]
    # The same prompt twice would be decoded twice; keep the first.
    seen, unique = set(), []
    for e in encoded:
        if e[0] not in seen:
            seen.add(e[0])
            unique.append(e)
    todo = [(e, [b for b in block_sizes if (e[0], b) not in done_runs]) for e in unique]
    todo = [(e, sizes) for e, sizes in todo if sizes or e[0] not in done_prompts]
    total = sum(len(s) for _, s in todo)

    fdir = features_dir(out)
    fdir.mkdir(exist_ok=True)
    eos_stop = 0
    with _open_for_append(out) as f:
        if old_meta is None:
            _append(f, meta)
        bar = tqdm(total=total, desc="sweep", unit="run", disable=not progress)
        for index, ((pid, text, toks), sizes) in enumerate(todo):
            cache, hidden, feats, prefill_s = prefill(model, draft, toks, features)
            if pid not in done_prompts:
                tmp = fdir / f"{pid}.tmp.safetensors"
                mx.save_safetensors(str(tmp), feats)
                os.replace(tmp, fdir / f"{pid}.safetensors")
                _append(f, {
                    "kind": "prompt", "id": pid, "text": text, "prompt_tokens": len(toks),
                    "prefill_s": prefill_s, "features": f"{fdir.name}/{pid}.safetensors",
                })
            for b in sizes:
                rewind(cache, draft, toks, hidden)
                bar.set_postfix(prompt=index + 1, block=b)
                r = decode.generate(
                    model, draft, tokenizer, toks, block_size=b, max_tokens=max_tokens,
                    temperature=temperature, seed=seed, prompt_cache=cache, refine=refine,
                )
                eos_stop += r.finish_reason == "stop"
                _append(f, {
                    "kind": "run", "prompt_id": pid, "block_size": b,
                    "mean_acceptance": r.mean_acceptance, "rounds": len(r.acceptance_lengths),
                    "tokens": r.generation_tokens, "decode_tokens_per_s": r.decode_tokens_per_s,
                    "finish_reason": r.finish_reason,
                    "output_sha1": hashlib.sha1(json.dumps(r.tokens).encode()).hexdigest()[:16],
                })
                bar.update(1)
            del cache, hidden
            mx.clear_cache()
        bar.close()
    return {"prompts": len(unique), "runs": total, "skipped_too_long": len(too_long), "stopped_at_eos": eos_stop}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_blockpilot.sweep", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--prompts", required=True, help=".txt, .jsonl, ShareGPT .json, or 'sharegpt' (installed)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-chars", type=int, default=None, help="skip longer prompts")
    parser.add_argument("--block-sizes", default="12-20", help="e.g. 12-20 or 8,12-16,32")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="logits", help="logits or logits,hidden")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--refine", action="store_true", help="refine the block size per round from each start size")
    parser.add_argument("--out", required=True, help="the sweep .jsonl (resumed if it exists)")
    args = parser.parse_args(argv)
    try:
        sizes = parse_block_sizes(args.block_sizes)
        features = parse_features(args.features)
        prompts = load_prompts(args.prompts, limit=args.limit, max_chars=args.max_chars)
        bundle = load_from_args(args)
        done = sweep(
            bundle.model, bundle.draft, bundle.tokenizer, prompts, sizes, args.out,
            max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed,
            features=features, chat=not args.no_chat_template, refine=args.refine,
        )
    except BlockPilotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {done['prompts']} prompts, {done['runs']} new runs"
        + (f", {done['skipped_too_long']} prompts skipped (too long for the context)" if done["skipped_too_long"] else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
