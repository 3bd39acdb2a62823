"""Ours side by side with mlx-lm and the official DFlash MLX backend (``python -m mlx_blockpilot.bench``).

Every configuration runs on every prompt, interleaved per prompt and repeat, in a
shuffled order each time (``run_order``), so machine noise and whatever one run leaves to
the next hit all rows alike:

- ``mlx-lm``: the target alone with ``mlx_lm.stream_generate`` (the baseline);
- ``ours B=N``: our speculative decoding at each fixed block size, ``ours auto``
  with the bundle's policy (its time and share of prefill are reported),
  ``ours auto+refine`` the same with the cost-blind per-round rule (``schedule.Refine``), and
  ``oracle``: the best fixed size per prompt (from the same runs); with calibrated costs,
  ``ours control`` (the per-round controller from B=2) and ``ours auto+control`` (from the
  policy's pick: what ``auto`` does by default) replace ``auto+refine``, learning round
  times and acceptance over the run as over one session's generations;
- ``dflash B=N``: the official ``dflash.model_mlx.stream_generate`` (when
  installed) on its own copy of the target, checked to give our tokens at T=0;
- ``engine B=N``: our loop with a drafter that pays the real drafter's cost but
  proposes the target's true continuation, against the bound
  ``mean acceptance / (t_draft(B) + t_verify(B))`` from isolated measurements.

All rows are timed the same way from outside: prefill = call -> first token;
decode tok/s = (tokens - 1) / (first token -> last token). Medians over repeats.
"""

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx

from .. import decode, target
from ..errors import BlockPilotError
from ..costs import LearnedCosts, measure
from ..options import GenerationOptions
from ..schedule import session_acceptance
from .drafters import true_continuation
from .report import mean_of, median_of, summarize

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
    position: Optional[int] = None  # its place in the order its prompt and repeat ran the rows in
    widths: Optional[Dict[int, int]] = None  # rounds by block size (ours)


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


def run_ours(model, draft, tokenizer, prompt, opts, block_size, policy=None, refine=False, costs=None,
             acceptance=None) -> Dict[str, Any]:
    stream = decode.stream_generate(
        model, draft, tokenizer, prompt, block_size=block_size, policy=policy, refine=refine, costs=costs,
        acceptance=acceptance,
        max_tokens=opts["max_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
        top_k=opts["top_k"], seed=opts.get("seed"),
    )
    tokens, prefill, tps, r = timed(stream, lambda r: r.tokens)
    return dict(
        tokens=tokens, prefill_s=prefill, decode_tokens_per_s=tps, block_size=r.block_size,
        mean_acceptance=r.mean_acceptance, rounds=len(r.acceptance_lengths), widths=dict(Counter(r.round_widths)),
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


def measure_costs(model, draft, context: int, widths: Sequence[int], reps: int = 5) -> Dict[int, Dict[str, float]]:
    """Seconds of one target forward and one draft pass at each width B, each evaluated alone,
    with ``context`` tokens cached (``costs.measure``)."""
    c = measure(model, draft, widths=widths, contexts=(context,), reps=reps)
    return {w: {"verify_s": v, "draft_s": d} for w, v, d in zip(c.widths, c.verify_s[0], c.draft_s[0])}


def profile_rounds(model, draft, tokenizer, prompt: List[int], block_size: int, max_tokens: int) -> Dict[str, Any]:
    """Greedy decoding with a sync after the draft pass and after the verify pass (PROFILING MODE: extra syncs).

    Returns the tokens and the per-round seconds of draft, verify (+ acceptance) and
    host bookkeeping, from ``decode.generate_step(timed=True)``.
    """
    opts = GenerationOptions(max_tokens=max_tokens, block_size=block_size)
    tokens, rounds = [], []
    for step in decode.generate_step(model, draft, list(prompt), opts, eos=tokenizer.eos_token_ids, timed=True):
        tokens.extend(step.tokens)
        if step.timings is not None:
            t = step.timings
            rounds.append({"draft_s": t.get("draft", 0.0), "verify_s": t["verify"], "host_s": t["host"],
                           "width": step.width, "accepted": len(step.tokens)})
    return {"tokens": tokens, "rounds": rounds}


# ----------------------------------------------------------------------------- the benchmark


def run_order(configs: Sequence[tuple], turn: int) -> List[tuple]:
    """The order of the rows in ``turn`` (a prompt of a repeat): shuffled, seeded by ``turn``.
    A fixed order gives one row the place right after mlx-lm every time (its buffers, its
    caches, its heat); a shuffle spreads places and neighbours over all rows. ``engine``
    rows, which need this turn's mlx-lm tokens, come last."""
    free = [c for c in configs if not c[0].startswith("engine")]
    random.Random(turn).shuffle(free)
    return free + [c for c in configs if c[0].startswith("engine")]


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
    categories: Optional[Sequence[str]] = None,
    costs=None,
    costs_path=None,
    rows: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Run every configuration on every prompt, interleaved; return all numbers (see ``summarize``).

    ``categories`` names each prompt's kind (chat, code, a context length, ...) for the
    per-category table; with calibrated ``costs`` the per-round controller gets its rows
    (``control``: from block size 2; ``auto+control``: from the policy's pick), which keep
    what they learn of the costs in ``costs_path`` (the calibration's file). ``rows`` keeps
    only the configurations of those names (mlx-lm, the reference, always runs)."""
    from tqdm import tqdm

    model, draft, tok = bundle.model, bundle.draft, bundle.tokenizer
    eos = set(tok.eos_token_ids)
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    greedy = GenerationOptions(**opts).greedy
    engine_sizes = [b for b in block_sizes if b > 1] if (engine and greedy) else []
    dflash_sizes = list(dflash_block_sizes) if official is not None else []
    vocab = target.vocab_size(model)

    configs: List[tuple] = [("mlx-lm", None)]
    configs += [(f"ours B={b}", b) for b in block_sizes]
    if bundle.policy is not None:  # with costs, the controller replaces the cost-blind refinement rule
        configs += [("ours auto", "auto")] + ([("ours auto+refine", "auto")] if costs is None else [])
    if costs is not None:
        configs += [("ours control", 2)] + ([("ours auto+control", "auto")] if bundle.policy is not None else [])
    configs += [(f"dflash B={b}", b) for b in dflash_sizes]
    configs += [(f"engine B={b}", b) for b in engine_sizes]
    if rows:
        unknown = [r for r in rows if r not in {name for name, _ in configs}]
        if unknown:
            raise BlockPilotError(f"--rows {', '.join(unknown)}: not a row of this benchmark; its rows are "
                                  + ", ".join(name for name, _ in configs))
        configs = [(name, b) for name, b in configs if name == "mlx-lm" or name in rows]

    # The controller's rows learn over the run as over a session: round times, acceptance.
    # Their corrections of the costs are kept in ``costs_path`` (the cached calibration) as a session's are.
    learned, acceptance = ((LearnedCosts(costs, path=costs_path), session_acceptance()) if costs is not None
                           else (None, None))

    def one(name, b, prompt, reference, opts):
        if name == "mlx-lm":
            return run_mlx_lm(model, tok, prompt, opts)
        if name.startswith("ours"):
            control = name.endswith("control")
            return run_ours(model, draft, tok, prompt, opts, b, policy=bundle.policy,
                            refine=name.endswith(("refine", "control")), costs=learned if control else None,
                            acceptance=acceptance if control else None)
        if name.startswith("dflash"):
            return run_official(official, tok, prompt, opts, b)
        oracle = true_continuation(draft, list(prompt) + reference, vocab)
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
            for position, (name, b) in enumerate(run_order(configs, rep * len(prompts) + p)):
                bar.set_postfix_str(f"prompt {p} {name}")
                res = one(name, b, prompt, this["mlx-lm"].tokens if "mlx-lm" in this else [], opts)
                this[name] = Run(config=name, prompt=p, repeat=rep, generation_tokens=len(res["tokens"]),
                                 position=position, **res)
                bar.update()
            if greedy:
                ref = _strip_eos(this["mlx-lm"].tokens, eos)
                for name, r in this.items():
                    if name.startswith(("ours", "engine")):
                        r.check = _strip_eos(r.tokens, eos) == ref
                    elif name.startswith("dflash"):
                        ours = this.get(f"ours B={r.block_size}")
                        r.check = _strip_eos(r.tokens, eos) == _strip_eos(ours.tokens if ours else this["mlx-lm"].tokens, eos)
            runs.extend(this[name] for name, _ in configs)  # the tables keep the configurations' order
        if widths:  # isolated costs once per repeat, so they see the same machine load as the runs
            cost_samples.append(measure_costs(model, draft, len(prompts[0]) + max_tokens // 2, widths))
    bar.close()
    isolated = {w: {k: median_of([c[w][k] for c in cost_samples]) for k in ("verify_s", "draft_s")} for w in widths}

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
            **{k: median_of([r[k] for r in rounds]) for k in ("draft_s", "verify_s", "host_s")},
            "mean_acceptance": mean_of([r["accepted"] for r in rounds]),
        }
        unsynced = [r for r in runs if r.config == f"ours B={profile}" and r.rounds]
        if unsynced:  # the same configuration in the timed runs: no extra syncs
            prof["round_s_unprofiled"] = median_of(
                [(r.generation_tokens - 1) / r.decode_tokens_per_s / r.rounds for r in unsynced if r.decode_tokens_per_s]
            )
    settings = dict(opts, seed=seed, repeats=repeats, block_sizes=list(block_sizes))
    results = summarize(runs, isolated, prof, len(prompts), settings,
                        list(categories) if categories else None, [len(p) for p in prompts])
    if costs is not None:
        results["calibration"] = calibration_check(runs, costs, [len(p) for p in prompts], learned, not greedy)
    return results


def calibration_check(runs: List[Run], costs, prompt_lengths: List[int], learned=None,
                      sampled: bool = False) -> Dict[str, Any]:
    """Calibrated round cost (of ``sampled`` rounds when the runs sampled) against the measured
    one of every fixed-size run (the round's mean over the run: decode seconds / rounds), by
    block size: median predicted/measured (``corrected_over_measured``: the same for the
    calibration with the corrections it held at the start, what the controller began from;
    ``learned_over_measured``: for ``learned``, the controller's costs after the run).
    ``corrected_relative_to_plain``: as below, with the corrections.

    ``relative_to_plain`` compares the ratios to plain decoding (B=1) on the same prompt and
    repeat instead: what steers the controller, and free of the machine's drift between the
    calibration and the run (the absolute ratio is not)."""
    out, measured_by, learned_by, corrected_by = {}, {}, {}, {}
    corrected = LearnedCosts(costs) if costs.corrections else None
    for r in runs:
        if not (r.config.startswith("ours B=") and r.rounds and r.decode_tokens_per_s):
            continue
        measured = (r.generation_tokens - 1) / r.decode_tokens_per_s / r.rounds
        context = prompt_lengths[r.prompt] + r.generation_tokens // 2
        predicted = costs.round_s(r.block_size, context, sampled)
        with_corrections = corrected.round_s(r.block_size, context, sampled) if corrected is not None else None
        measured_by[(r.block_size, r.prompt, r.repeat)] = (predicted, measured, with_corrections)
        out.setdefault(r.block_size, []).append(predicted / measured)
        if learned is not None:
            learned_by.setdefault(r.block_size, []).append(learned.round_s(r.block_size, context, sampled) / measured)
        if with_corrections is not None:
            corrected_by.setdefault(r.block_size, []).append(with_corrections / measured)
    relative, corrected_relative = {}, {}
    for (b, prompt, repeat), (predicted, measured, with_corrections) in measured_by.items():
        plain = measured_by.get((1, prompt, repeat))
        if b > 1 and plain:
            relative.setdefault(b, []).append((predicted / plain[0]) / (measured / plain[1]))
            if with_corrections is not None:
                corrected_relative.setdefault(b, []).append((with_corrections / plain[2]) / (measured / plain[1]))
    return {str(b): {"median_predicted_over_measured": median_of(v), "runs": len(v), "min": min(v), "max": max(v),
                     "relative_to_plain": median_of(relative[b]) if b in relative else None,
                     "corrected_over_measured": median_of(corrected_by[b]) if b in corrected_by else None,
                     "corrected_relative_to_plain": (median_of(corrected_relative[b]) if b in corrected_relative
                                                     else None),
                     "learned_over_measured": median_of(learned_by[b]) if b in learned_by else None}
            for b, v in sorted(out.items())}
