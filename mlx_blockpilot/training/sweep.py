"""Decode every prompt at every candidate block size (``python -m mlx_blockpilot.sweep``).

The result is the training data of a BlockPilot policy (``sweep_file``): per (prompt,
block size) the mean acceptance length, rounds, tokens and decode tokens/s; per prompt
the prefill features the policy reads at inference. A restarted sweep skips the pairs
already in the file.

Each prompt is prefilled once by the engine (``generate_step``): the features come
from that pass, and every block size then decodes from the same prompt cache (the
engine re-runs only the last prompt token, exactly as a fresh generation does), so no
extra target pass is spent on features and decoding is unchanged. At T=0 every size
must give the same output: compare ``output_sha1`` across a prompt's runs. With
``refine`` each run starts at its size and refines it per round.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Sequence

import mlx.core as mx

from .. import decode, target
from ..errors import BlockPilotError
from ..options import GenerationOptions
from ..prompts import encode_prompt
from .sweep_file import append, check_features, features_dir, open_for_append, prompt_id, read_sweep, META_DEFAULTS, META_KEYS


def feature_layer(draft) -> int:
    return max(draft.config.target_layer_ids)


def prefill_features(model, draft, cache, tokens, features: Sequence[str]):
    """Prefill ``tokens`` into ``cache`` with the engine: (features, seconds)."""
    steps = decode.generate_step(model, draft, tokens, GenerationOptions(max_tokens=1, block_size=1), prompt_cache=cache)
    pre = next(steps).prefill
    steps.close()
    feats = {"logits": pre.logits.astype(mx.float16)}
    if "hidden" in features:
        feats["hidden"] = decode.policy_features(model, draft, pre.logits, pre.hidden, "hidden").astype(mx.float16)
    mx.eval(feats)
    return feats, pre.seconds


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
    top_p: float = 1.0,
    top_k: int = 0,
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
    features = check_features(features)
    GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # checked now
    meta = {
        "kind": "meta",
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
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
        diff = [k for k in META_KEYS if old_meta.get(k, META_DEFAULTS.get(k)) != meta[k]]
        if diff:
            raise BlockPilotError(
                f"{out} was made with different settings ({', '.join(f'{k}={old_meta.get(k)!r}' for k in diff)}); "
                "resume with the same settings or write to a new --out"
            )

    encoded = []
    for text in prompts:
        toks = encode_prompt(tokenizer, text, chat=meta["chat"])
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
    with open_for_append(out) as f:
        if old_meta is None:
            append(f, meta)
        bar = tqdm(total=total, desc="sweep", unit="run", disable=not progress)
        for index, ((pid, text, toks), sizes) in enumerate(todo):
            cache = decode.make_cache(model, draft)
            feats, prefill_s = prefill_features(model, draft, cache, toks, features)
            if pid not in done_prompts:
                tmp = fdir / f"{pid}.tmp.safetensors"
                mx.save_safetensors(str(tmp), feats)
                os.replace(tmp, fdir / f"{pid}.safetensors")
                append(f, {
                    "kind": "prompt", "id": pid, "text": text, "prompt_tokens": len(toks),
                    "prefill_s": prefill_s, "features": f"{fdir.name}/{pid}.safetensors",
                })
            for b in sizes:
                bar.set_postfix(prompt=index + 1, block=b)
                r = decode.generate(
                    model, draft, tokenizer, toks, block_size=b, max_tokens=max_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, prompt_cache=cache, refine=refine,
                )
                eos_stop += r.finish_reason == "stop"
                append(f, {
                    "kind": "run", "prompt_id": pid, "block_size": b,
                    "mean_acceptance": r.mean_acceptance, "rounds": len(r.acceptance_lengths),
                    "tokens": r.generation_tokens, "decode_tokens_per_s": r.decode_tokens_per_s,
                    "finish_reason": r.finish_reason,
                    "output_sha1": hashlib.sha1(json.dumps(r.tokens).encode()).hexdigest()[:16],
                })
                bar.update(1)
            del cache
            mx.clear_cache()
        bar.close()
    return {"prompts": len(unique), "runs": total, "skipped_too_long": len(too_long), "stopped_at_eos": eos_stop}
