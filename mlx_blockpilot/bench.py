"""``python -m mlx_blockpilot.bench``: ours side by side with mlx-lm and the official DFlash MLX backend.

Every configuration runs on every prompt, interleaved per prompt and repeat so
machine noise hits all rows alike:

- ``mlx-lm``: the target alone with ``mlx_lm.stream_generate`` (the baseline);
- ``ours B=N``: our speculative decoding at each fixed block size, ``ours auto``
  with the bundle's policy (its time and share of prefill are reported),
  ``ours auto+refine`` the same with per-round refinement, and ``oracle``: the best
  fixed size per prompt (from the same runs);
- ``dflash B=N``: the official ``dflash.model_mlx.stream_generate`` (when
  installed) on its own copy of the target, checked to give our tokens at T=0;
- ``engine B=N``: our loop with a drafter that pays the real drafter's cost but
  proposes the target's true continuation, against the bound
  ``mean acceptance / (t_draft(B) + t_verify(B))`` from isolated measurements.

All rows are timed the same way from outside: prefill = call -> first token;
decode tok/s = (tokens - 1) / (first token -> last token). Medians over repeats.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx

from . import decode, target
from .errors import BlockPilotError
from .generate import add_model_args, block_size_arg, load_from_args
from .prompts import load_prompts
from .sampling import SamplingParams, greedy_tokens

# ----------------------------------------------------------------------------- prompts


def read_prompts(src, limit: Optional[int] = None) -> List[str]:
    """Prompts from .txt / JSONL / ShareGPT JSON (``prompts.load_prompts``)."""
    return load_prompts(src, limit=limit)


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> List[List[int]]:
    """Token ids, under the chat template when the tokenizer has one and ``chat``."""
    if chat and getattr(tokenizer, "has_chat_template", False):
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
            for p in prompts
        ]
    return [list(tokenizer.encode(p)) for p in prompts]


# ----------------------------------------------------------------------------- models


def resolve_model(args) -> Dict[str, Any]:
    """The one place that decides what is benchmarked: the bundle and its target/drafter dirs."""
    bundle = load_from_args(args)
    if args.model:
        target_dir, draft_dir = Path(args.target or Path(args.model) / "target"), Path(args.draft or Path(args.model) / "draft")
    else:
        target_dir, draft_dir = Path(args.target), Path(args.draft)
    return {"bundle": bundle, "target_dir": target_dir, "draft_dir": draft_dir}


def load_official(target_dir, draft_dir):
    """``(model_mlx module, its own target copy, its drafter)``, or None when dflash is not installed.

    The official backend wraps the layers of the model it is given, so it gets a
    separately loaded target. Its ``load_draft`` downloads by repo id; for a local
    directory the download is replaced by the identity inside this call only.
    """
    try:
        from dflash import model_mlx
    except ImportError:
        return None
    from unittest import mock

    from .bundle import load_target

    model, _ = load_target(target_dir)
    with mock.patch.object(model_mlx, "snapshot_download", lambda repo_id, **kw: repo_id):
        draft = model_mlx.load_draft(str(draft_dir))
    return model_mlx, model, draft


class TrueContinuationDraft:
    """Runs the real drafter (so a round costs what it really costs) but proposes the target's own continuation.

    ``sequence`` is prompt + the target's greedy output, indexed by absolute position.
    """

    def __init__(self, draft, sequence: Sequence[int], vocab_size: int):
        self.draft = draft
        self.config = draft.config
        self.sequence = list(sequence)
        self.vocab_size = vocab_size

    def make_cache(self):
        return self.draft.make_cache()

    def propose(self, model, block, context_hidden, cache):
        logits = self.draft.propose(model, block, context_hidden, cache)
        start = cache[0].offset  # absolute position of block[0]: the context is everything before it
        rows = [self.sequence[p] if p < len(self.sequence) else 0 for p in range(start + 1, start + block.shape[1])]
        onehot = (mx.arange(self.vocab_size)[None] == mx.array(rows)[:, None]).astype(logits.dtype) * 30.0
        return onehot + 0 * logits  # keeps the real draft pass in the graph


# ----------------------------------------------------------------------------- one timed run


@dataclass
class Run:
    """One generation of one configuration on one prompt."""

    config: str
    prompt: int
    repeat: int
    prefill_s: float
    decode_tokens_per_s: float
    generation_tokens: int
    block_size: Optional[int] = None
    mean_acceptance: Optional[float] = None
    rounds: Optional[int] = None
    tokens: List[int] = field(default_factory=list)
    policy_s: Optional[float] = None  # the policy's time after prefill ("ours auto")
    policy_share: Optional[float] = None  # policy_s / the engine's own prefill time
    check: Optional[bool] = None  # same tokens as the reference (mlx-lm for ours, ours for dflash)


def timed(stream: Iterator[Any], tokens_of: Callable[[Any], List[int]]):
    """Consume ``stream``; return (all tokens, prefill seconds, decode tok/s, last response).

    Prefill = call -> first token; decode = first token -> last token, the same for every row.
    """
    tokens: List[int] = []
    tic = time.perf_counter()
    first = last = None
    r = None
    for r in stream:
        tokens.extend(tokens_of(r))
        now = time.perf_counter()
        if first is None and tokens:
            first = now
        last = now
    prefill = (first or time.perf_counter()) - tic
    span = (last - first) if first is not None else 0.0
    tps = (len(tokens) - 1) / span if len(tokens) > 1 and span > 0 else 0.0
    return tokens, prefill, tps, r


def run_mlx_lm(model, tokenizer, prompt, opts) -> Dict[str, Any]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"])
    if opts.get("seed") is not None:
        mx.random.seed(opts["seed"])
    stream = stream_generate(model, tokenizer, prompt, max_tokens=opts["max_tokens"], sampler=sampler)
    tokens, prefill, tps, _ = timed(stream, lambda r: [r.token])
    return dict(tokens=tokens, prefill_s=prefill, decode_tokens_per_s=tps)


def run_ours(model, draft, tokenizer, prompt, opts, block_size, policy=None, refine=False) -> Dict[str, Any]:
    stream = decode.stream_generate(
        model, draft, tokenizer, prompt, block_size=block_size, policy=policy, refine=refine,
        max_tokens=opts["max_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
        top_k=opts["top_k"], seed=opts.get("seed"),
    )
    tokens, prefill, tps, r = timed(stream, lambda r: r.tokens)
    return dict(
        tokens=tokens, prefill_s=prefill, decode_tokens_per_s=tps, block_size=r.block_size,
        mean_acceptance=r.mean_acceptance, rounds=len(r.acceptance_lengths),
        policy_s=r.policy_s if policy is not None and block_size == "auto" else None,
        policy_share=r.policy_s / r.prefill_s if policy is not None and block_size == "auto" and r.prefill_s else None,
    )


def run_official(official, tokenizer, prompt, opts, block_size) -> Dict[str, Any]:
    model_mlx, model, draft = official
    tokenizer.detokenizer.reset()  # the official loop does not reset the shared detokenizer
    if opts.get("seed") is not None:
        mx.random.seed(opts["seed"])
    stream = model_mlx.stream_generate(
        model, draft, tokenizer, prompt, block_size=block_size, max_tokens=opts["max_tokens"],
        temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"],
    )
    accepted: List[int] = []

    def tokens_of(r):
        if r.accepted is not None:
            accepted.append(r.accepted)
        return list(r.tokens)

    tokens, prefill, tps, _ = timed(stream, tokens_of)
    return dict(
        tokens=tokens, prefill_s=prefill, decode_tokens_per_s=tps, block_size=block_size,
        mean_acceptance=sum(accepted) / len(accepted) if accepted else 0.0, rounds=len(accepted),
    )


# ----------------------------------------------------------------------------- isolated costs and profile


def _median_time(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure_costs(model, draft, prompt: List[int], widths: Sequence[int], reps: int = 5) -> Dict[int, Dict[str, float]]:
    """Seconds for one target forward at width B and one draft pass at B (context: ``prompt``), each evaluated alone."""
    ids = draft.config.target_layer_ids
    cache = decode.make_cache(model, draft)
    logits = decode._prefill(model, prompt, cache, ids, 2048)
    mx.eval(logits, cache.pending, [c.state for c in cache.target])
    ctx = cache.pending
    out: Dict[int, Dict[str, float]] = {}
    for w in widths:
        toks = mx.array([(prompt * w)[:w]])

        def verify():
            lg, h = target.forward(model, toks, cache.target, ids)
            mx.eval(lg, h)
            for c in cache.target:
                c.trim(w)

        cost = {"verify_s": _median_time(verify, reps), "draft_s": 0.0}
        if w > 1:
            n_ctx = min(w, ctx.shape[1])  # at full acceptance a round brings w new context positions
            dcache = draft.make_cache()
            seen = ctx.shape[1] - n_ctx
            if seen:  # the drafter has already seen the rest of the context
                mx.eval(draft.propose(model, mx.array([[prompt[-1]] * w]), ctx[:, :seen], dcache))
            block = mx.array([[prompt[-1]] + [draft.config.mask_token_id] * (w - 1)])

            def draft_pass():
                mx.eval(draft.propose(model, block, ctx[:, seen:], dcache))
                for c in dcache:
                    c.trim(n_ctx)

            cost["draft_s"] = _median_time(draft_pass, reps)
        out[w] = cost
    return out


class _TimedDraft:
    """Profiling only: evaluates the draft pass on its own and records its time."""

    def __init__(self, draft):
        self.draft, self.config, self.times = draft, draft.config, []

    def make_cache(self):
        return self.draft.make_cache()

    def propose(self, model, block, context_hidden, cache):
        tic = time.perf_counter()
        logits = self.draft.propose(model, block, context_hidden, cache)
        mx.eval(logits)
        self.times.append(time.perf_counter() - tic)
        return logits


def profile_rounds(model, draft, tokenizer, prompt: List[int], block_size: int, max_tokens: int) -> Dict[str, Any]:
    """Greedy decoding with a sync after the draft pass and after the verify pass (PROFILING MODE: extra syncs).

    Uses the engine's own round (``decode._draft_round``); returns the tokens and
    the per-round seconds of draft, verify (+ acceptance) and host bookkeeping.
    """
    timer = _TimedDraft(draft)
    cache = decode.make_cache(model, timer)
    params = SamplingParams(0.0)
    eos = set(tokenizer.eos_token_ids)
    logits = decode._prefill(model, list(prompt), cache, draft.config.target_layer_ids, 2048)
    last = greedy_tokens(logits).item()
    tokens, rounds = [last], []
    key = mx.random.key(0)
    while len(tokens) < max_tokens and last not in eos:
        w = min(block_size, max_tokens - len(tokens))
        n_draft = len(timer.times)
        tic = time.perf_counter()
        drafted, accepted, nxt, hidden = decode._draft_round(model, timer, cache, last, w, params, key)
        mx.eval(drafted, accepted, nxt, hidden)
        verify_done = time.perf_counter()
        t_draft = timer.times[-1] if len(timer.times) > n_draft else 0.0
        values = mx.concatenate([drafted.astype(mx.int32), accepted[None].astype(mx.int32), nxt[None].astype(mx.int32)]).tolist()
        a = values[w - 1]
        new = (values[:a] + [values[w]])[: max_tokens - len(tokens)]
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        if stop is not None:
            new = new[: stop + 1]
        for c in cache.target:
            c.trim(w - len(new))
        cache.tokens.extend([last] + new[:-1])
        kept = hidden[:, : len(new)]
        cache.pending = kept if cache.pending is None else mx.concatenate([cache.pending, kept], axis=1)
        tokens.extend(new)
        last = new[-1]
        done = time.perf_counter()
        rounds.append({"draft_s": t_draft, "verify_s": verify_done - tic - t_draft, "host_s": done - verify_done, "width": w, "accepted": len(new)})
    return {"tokens": tokens, "rounds": rounds}


# ----------------------------------------------------------------------------- the benchmark


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _strip_eos(tokens, eos):
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def run_benchmark(
    bundle,
    prompts: List[List[int]],
    *,
    block_sizes: Sequence[int] = (1, 4, 8, 16),
    dflash_block_sizes: Sequence[int] = (),
    official=None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    repeats: int = 3,
    engine: bool = True,
    profile: Optional[int] = None,
    profile_prompts: int = 2,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run every configuration on every prompt, interleaved; return all numbers (see ``summarize``)."""
    from tqdm import tqdm

    model, draft, tok = bundle.model, bundle.draft, bundle.tokenizer
    greedy = temperature == 0
    eos = set(tok.eos_token_ids)
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    engine_sizes = [b for b in block_sizes if b > 1] if (engine and greedy) else []
    dflash_sizes = list(dflash_block_sizes) if official is not None else []
    vocab = target.vocab_size(model)

    configs: List[tuple] = [("mlx-lm", None)]
    configs += [(f"ours B={b}", b) for b in block_sizes]
    if bundle.policy is not None:
        configs += [("ours auto", "auto"), ("ours auto+refine", "auto")]
    configs += [(f"dflash B={b}", b) for b in dflash_sizes]
    configs += [(f"engine B={b}", b) for b in engine_sizes]

    def one(name, b, prompt, reference, opts):
        if name == "mlx-lm":
            return run_mlx_lm(model, tok, prompt, opts)
        if name.startswith("ours"):
            return run_ours(model, draft, tok, prompt, opts, b, policy=bundle.policy, refine=name.endswith("+refine"))
        if name.startswith("dflash"):
            return run_official(official, tok, prompt, opts, b)
        oracle = TrueContinuationDraft(draft, list(prompt) + reference, vocab)
        return run_ours(model, oracle, tok, prompt, opts, b)

    # Warm-up: every configuration once on the first prompt, untimed.
    warm = dict(opts, max_tokens=min(max_tokens, 8))
    ref0 = run_mlx_lm(model, tok, prompts[0], warm)["tokens"]
    for name, b in configs:
        one(name, b, prompts[0], ref0, warm)

    widths = sorted(set(engine_sizes) | ({profile} if profile else set()) | {1}) if (engine_sizes or profile) else []
    cost_samples: List[Dict[int, Dict[str, float]]] = []
    runs: List[Run] = []
    bar = tqdm(total=repeats * len(prompts) * len(configs), desc="bench", disable=not progress)
    for rep in range(repeats):
        for p, prompt in enumerate(prompts):
            if seed is not None:
                opts["seed"] = seed + 1000 * rep + p
            this: Dict[str, Run] = {}
            for name, b in configs:
                bar.set_postfix_str(f"prompt {p} {name}")
                res = one(name, b, prompt, this["mlx-lm"].tokens if "mlx-lm" in this else [], opts)
                this[name] = Run(config=name, prompt=p, repeat=rep, generation_tokens=len(res["tokens"]), **res)
                bar.update()
            if greedy:
                ref = _strip_eos(this["mlx-lm"].tokens, eos)
                for name, r in this.items():
                    if name.startswith(("ours", "engine")):
                        r.check = _strip_eos(r.tokens, eos) == ref
                    elif name.startswith("dflash"):
                        ours = this.get(f"ours B={r.block_size}")
                        r.check = _strip_eos(r.tokens, eos) == _strip_eos(ours.tokens if ours else this["mlx-lm"].tokens, eos)
            runs.extend(this.values())
        if widths:  # isolated costs once per repeat, so they see the same machine load as the runs
            cost_samples.append(measure_costs(model, draft, prompts[0] + runs[0].tokens[: max_tokens // 2], widths))
    bar.close()
    costs = {w: {k: _median([c[w][k] for c in cost_samples]) for k in ("verify_s", "draft_s")} for w in widths}

    prof = None
    if profile:
        rounds, same = [], 0
        chosen = prompts[: max(1, profile_prompts)]
        for p, prompt in enumerate(tqdm(chosen, desc=f"profile B={profile}", disable=not progress)):
            out = profile_rounds(model, draft, tok, prompt, profile, max_tokens)
            rounds += out["rounds"]
            base = next(r for r in runs if r.config == "mlx-lm" and r.prompt == p)
            same += _strip_eos(out["tokens"], eos) == _strip_eos(base.tokens, eos)
        prof = {
            "block_size": profile,
            "rounds": len(rounds),
            "prompts": len(chosen),
            "same_tokens_as_mlx_lm": f"{same}/{len(chosen)}",
            **{k: _median([r[k] for r in rounds]) for k in ("draft_s", "verify_s", "host_s")},
            "mean_acceptance": _mean([r["accepted"] for r in rounds]),
        }
        unsynced = [r for r in runs if r.config == f"ours B={profile}" and r.rounds]
        if unsynced:  # the same configuration in the timed runs: no extra syncs
            prof["round_s_unprofiled"] = _median(
                [(r.generation_tokens - 1) / r.decode_tokens_per_s / r.rounds for r in unsynced if r.decode_tokens_per_s]
            )
    return summarize(runs, costs, prof, len(prompts), dict(opts, seed=seed, repeats=repeats, block_sizes=list(block_sizes)))


def summarize(runs: List[Run], costs, profile, n_prompts: int, settings) -> Dict[str, Any]:
    """Per-prompt medians over repeats, rows (mean over prompts), oracle row, engine bounds."""
    names = list(dict.fromkeys(r.config for r in runs))
    per_prompt: Dict[str, List[Dict[str, Any]]] = {}
    for name in names:
        rows = []
        for p in range(n_prompts):
            rs = [r for r in runs if r.config == name and r.prompt == p]
            rows.append({
                "prompt": p,
                "decode_tokens_per_s": _median([r.decode_tokens_per_s for r in rs]),
                "prefill_s": _median([r.prefill_s for r in rs]),
                "mean_acceptance": _median([r.mean_acceptance for r in rs]),
                "generation_tokens": _median([len(r.tokens) for r in rs]),
                "block_size": rs[0].block_size if rs else None,
            })
        per_prompt[name] = rows
    fixed = [n for n in names if n.startswith("ours B=")]
    if fixed:
        best = []
        for p in range(n_prompts):
            name = max(fixed, key=lambda n: per_prompt[n][p]["decode_tokens_per_s"] or 0.0)
            best.append(dict(per_prompt[name][p]))
        per_prompt["oracle"] = best
        names.insert(names.index(fixed[-1]) + 1 + sum(n.startswith("ours auto") for n in names), "oracle")

    base = _mean([x["decode_tokens_per_s"] for x in per_prompt["mlx-lm"]])
    table = []
    for name in names:
        pp = per_prompt[name]
        tps = _mean([x["decode_tokens_per_s"] for x in pp])
        checks = [r.check for r in runs if r.config == name and r.check is not None]
        row = {
            "config": name,
            "block_size": pp[0]["block_size"] if name.startswith(("ours B", "dflash", "engine")) else None,
            "decode_tokens_per_s": tps,
            "speedup": tps / base if base and tps else None,
            "prefill_s": _mean([x["prefill_s"] for x in pp]),
            "mean_acceptance": _mean([x["mean_acceptance"] for x in pp]),
            "same_tokens": f"{sum(checks)}/{len(checks)}" if checks else None,
        }
        if name == "oracle":
            row["chosen_block_sizes"] = [x["block_size"] for x in pp]
        if name.startswith("ours auto"):
            row["chosen_block_sizes"] = [x["block_size"] for x in pp]
            mine = [r for r in runs if r.config == name]
            row["policy_ms"] = 1e3 * _median([r.policy_s for r in mine])
            row["policy_share_of_prefill"] = _median([r.policy_share for r in mine])
        if name.startswith("engine") and row["block_size"] in costs:
            c = costs[row["block_size"]]
            row["bound_tokens_per_s"] = row["mean_acceptance"] / (c["draft_s"] + c["verify_s"])
            row["efficiency"] = tps / row["bound_tokens_per_s"]
        table.append(row)
    return {
        "settings": settings,
        "table": table,
        "per_prompt": per_prompt,
        "costs": {str(k): v for k, v in costs.items()},
        "profile": profile,
        "runs": [asdict(r) for r in runs],
    }


# ----------------------------------------------------------------------------- outputs


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(results: Dict[str, Any]) -> str:
    lines = [
        "| configuration | decode tok/s | speedup vs mlx-lm | prefill s | mean acceptance | same tokens | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["table"]:
        notes = []
        if "chosen_block_sizes" in r:
            notes.append("sizes " + ",".join(str(b) for b in r["chosen_block_sizes"]))
        if "policy_ms" in r:
            notes.append(f"policy {r['policy_ms']:.2f} ms = {r['policy_share_of_prefill']:.2%} of prefill")
        if "bound_tokens_per_s" in r:
            notes.append(f"bound {r['bound_tokens_per_s']:.1f} tok/s, efficiency {r['efficiency']:.0%}")
        lines.append(
            f"| {r['config']} | {_fmt(r['decode_tokens_per_s'], '.1f')} | {_fmt(r['speedup'], '.2f')}x | "
            f"{_fmt(r['prefill_s'], '.3f')} | {_fmt(r['mean_acceptance'], '.2f')} | {r['same_tokens'] or ''} | {'; '.join(notes)} |"
        )
    if results.get("costs"):
        lines += ["", "Isolated costs (each evaluated alone, median):", "",
                  "| B | target forward at width B, ms | draft pass at B, ms |", "|---:|---:|---:|"]
        for b, c in results["costs"].items():
            lines.append(f"| {b} | {c['verify_s'] * 1e3:.1f} | {c['draft_s'] * 1e3:.1f} |")
    prof = results.get("profile")
    if prof:
        total = prof["draft_s"] + prof["verify_s"] + prof["host_s"]
        lines += ["", f"Per-round time split at B={prof['block_size']} (PROFILING MODE: a sync after the draft and after "
                  f"the verify pass; medians over {prof['rounds']} rounds, same tokens as mlx-lm {prof['same_tokens_as_mlx_lm']}):", "",
                  "| draft pass ms | verify pass ms | host/accept ms | round ms (profiled) | round ms (timed runs, no extra syncs) |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {prof['draft_s'] * 1e3:.1f} ({prof['draft_s'] / total:.0%}) | {prof['verify_s'] * 1e3:.1f} "
                  f"({prof['verify_s'] / total:.0%}) | {prof['host_s'] * 1e3:.1f} ({prof['host_s'] / total:.0%}) | "
                  f"{total * 1e3:.1f} | {_fmt((prof.get('round_s_unprofiled') or 0) * 1e3, '.1f')} |"]
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    names = [r["config"] for r in table]
    colors = ["tab:gray" if n == "mlx-lm" else "tab:red" if n.startswith("dflash") else
              "tab:green" if n.startswith("engine") else "tab:blue" for n in names]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.8 * len(names)), 7), sharex=True)
    a1.bar(names, [r["decode_tokens_per_s"] or 0 for r in table], color=colors)
    a1.set_ylabel("decode tokens/s")
    a1.set_title("Decode speed and mean acceptance per configuration (mean over prompts)")
    a2.bar(names, [r["mean_acceptance"] or 0 for r in table], color=colors)
    a2.set_ylabel("mean acceptance (tokens/round)")
    a2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    p1 = out / "tokens_per_s.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, color, label in (("ours B=", "tab:blue", "ours"), ("dflash B=", "tab:red", "dflash.model_mlx"),
                                 ("engine B=", "tab:green", "ours, true-continuation drafter")):
        pts = sorted((r["block_size"], r["speedup"]) for r in table if r["config"].startswith(prefix) and r["speedup"])
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=label)
    bounds = sorted((r["block_size"], r["bound_tokens_per_s"] / (r["decode_tokens_per_s"] / r["speedup"]))
                    for r in table if "bound_tokens_per_s" in r and r["speedup"])
    if bounds:
        ax.plot(*zip(*bounds), "--", color="tab:green", alpha=0.6, label="bound from isolated costs")
    ax.axhline(1.0, color="tab:gray", lw=1, label="mlx-lm")
    ax.set_xlabel("block size B")
    ax.set_ylabel("decode speedup vs mlx-lm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "speedup_vs_block_size.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def machine() -> Dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
    }


def write_outputs(results: Dict[str, Any], out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plot(results, out)]


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_blockpilot.bench", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--prompts", required=True, help=".txt (one per line), .jsonl (prompt) or ShareGPT .json")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--dflash-block-sizes", type=int, nargs="*", default=None,
                        help="block sizes for dflash.model_mlx (default: the fixed sizes >= 2; none to skip)")
    parser.add_argument("--no-engine", action="store_true", help="skip the true-continuation engine rows")
    parser.add_argument("--profile", type=block_size_arg, default=None, metavar="B",
                        help="also time draft / verify / host per round at block size B (adds syncs)")
    parser.add_argument("--profile-prompts", type=int, default=2, help="profile on the first N prompts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1 or args.max_tokens < 2:
            raise BlockPilotError("--repeats must be >= 1 and --max-tokens >= 2")
        if any(b < 1 for b in args.block_sizes) or any(b < 2 for b in args.dflash_block_sizes or []):
            raise BlockPilotError("block sizes must be >= 1 (>= 2 for dflash)")
        if args.profile is not None and (not isinstance(args.profile, int) or args.profile < 1):
            raise BlockPilotError("--profile takes a fixed block size >= 1")
        texts = read_prompts(args.prompts, args.num_prompts)
        resolved = resolve_model(args)
        bundle = resolved["bundle"]
        prompts = encode_prompts(bundle.tokenizer, texts, chat=not args.no_chat_template)
        dsizes = [b for b in args.block_sizes if b >= 2] if args.dflash_block_sizes is None else args.dflash_block_sizes
        official = load_official(resolved["target_dir"], resolved["draft_dir"]) if dsizes else None
        if dsizes and official is None:
            print("note: dflash is not installed (pip install --no-deps dflash==0.1.0); skipping its rows", file=sys.stderr)
        results = run_benchmark(
            bundle, prompts, block_sizes=args.block_sizes, dflash_block_sizes=dsizes, official=official,
            max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            repeats=args.repeats, engine=not args.no_engine, profile=args.profile, profile_prompts=args.profile_prompts,
        )
    except BlockPilotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["command"] = "python -m mlx_blockpilot.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    results["machine"] = machine()
    results["prompts"] = texts
    results["model"] = {"target": str(resolved["target_dir"]), "draft": str(resolved["draft_dir"])}
    files = write_outputs(results, Path(args.out))
    print(markdown(results))
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
