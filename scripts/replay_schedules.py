"""Schedules replayed on recorded acceptance: noise-free tokens/s by width rule.

    scripts/with-openblas python scripts/replay_schedules.py --record acc.json --limit 8 [--temp 0.7]
    scripts/with-openblas python scripts/replay_schedules.py --replay acc.json --truth real_round_s.json

Greedy output does not depend on the schedule, so one plain decoding per prompt gives the
tokens, one target pass over prompt + answer their features, and one drafter pass per answer
position and width (2 to 8) how many drafts a round starting there would keep (checked against
real rounds: identical). With ``--temp`` (sampling) the answer is one sampled from the target,
and each entry holds each draft's probability of being kept given the ones before
(``sampling.accept_sampled``'s ``expected``: ``sum(min(p, q))`` of the drafter's and the
target's distributions, the target's taken along the recorded answer, an approximation where a
kept draft differs from the answer's token); the replay draws the kept drafts from them, the
same draws for every schedule (``--draws`` sets of them).

``--replay`` then runs fixed widths, the per-prompt oracle over them and ``schedule.CostAware``
(with each ``--memory`` and ``--trust``) on that table: on the calibration alone, told each round's
time (as decoding does with ``costs.LearnedCosts``; times scattered by ``--noise``), and also
starting each prompt from the acceptance of the ones before (a session). What a round costs comes
from ``--truth`` (real round seconds by width 1-8 as a JSON list, measured elsewhere) or else the
calibration (``--calibration`` or the bundle's); ``--spells`` slows every round of every schedule
by a factor at the same moments of replayed time (spells of load, as measured on this machine),
``--skew`` scales what the controller's calibration says drafted rounds cost (a calibration off
by that much). On this shared CPU a 1-2% difference between schedules is lost in the noise of
real runs; here it is not.
"""

import argparse
import gzip
import itertools
import json
import math
import random
import statistics
from dataclasses import replace

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache
from tqdm import tqdm

from mlx_blockpilot import target
from mlx_blockpilot.bundle import load
from mlx_blockpilot.cli.bench import prompt_source
from mlx_blockpilot.costs import Costs, LearnedCosts, calibrate, read_costs
from mlx_blockpilot.decode import generate_step, make_cache, prefill
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.draft import target_tokens
from mlx_blockpilot.options import GenerationOptions
from mlx_blockpilot.prompts import encode_prompt, load_prompts
from mlx_blockpilot.sampling import probabilities
from mlx_blockpilot.schedule import CostAware, session_acceptance

WIDTHS = range(2, 9)


def record(bundle, prompt, max_tokens, temperature=0.0, seed=0):
    """``accepted[t][w - 2]`` for a round of width ``w`` whose last committed token is answer token
    ``t``: greedily, how many drafts it keeps; sampling (``temperature`` > 0), each draft's
    probability of being kept given the ones before."""
    eos = set(bundle.tokenizer.eos_token_ids)
    opts = GenerationOptions(max_tokens=max_tokens, block_size=1, refine=False, temperature=temperature, seed=seed)
    steps = generate_step(bundle.model, bundle.draft, prompt, opts, eos=eos)
    seq = prompt + [t for step in steps for t in step.tokens]
    features = prefill(bundle.model, bundle.draft, make_cache(bundle.model, bundle.draft), seq).hidden
    sampled, ids = not opts.greedy, bundle.draft.draft_ids()
    if sampled:  # the target's distributions along the answer: row j is the one after seq[len(prompt) - 1 + j]
        logits, _ = target.forward(bundle.model, mx.array([seq]), target.make_cache(bundle.model), ())
        p = probabilities(logits[0, len(prompt) - 1 :], opts)
        p = p if ids is None else p[:, ids]  # on the drafter's vocabulary
        mx.eval(p)
    dcache, mask, read, table = bundle.draft.make_cache(), bundle.draft.config.mask_token_id, 0, []
    for t in range(len(prompt), len(seq) - 1):
        row = []
        for w in WIDTHS:  # the drafter reads the features before `t` (then taken back), drafts w - 1
            block = mx.array([[seq[t]] + [mask] * (w - 1)])
            logits = bundle.draft.propose(bundle.model, block, features[:, read:t], dcache)
            if sampled:  # draft k (1-based) is judged by the target's distribution after seq[t + k - 1]
                rows = p[t - len(prompt) + 1 : t - len(prompt) + w]
                q = probabilities(logits[: rows.shape[0]], opts)
                kept = mx.minimum(rows, q).sum(axis=-1).tolist()
                row.append([round(a, 4) for a in kept] + [0.0] * (w - 1 - len(kept)))
            else:
                drafted = target_tokens(ids, mx.argmax(logits, axis=-1)).tolist()
                kept = 0
                while kept < w - 1 and t + 1 + kept < len(seq) and drafted[kept] == seq[t + 1 + kept]:
                    kept += 1
                row.append(kept)
            trim_prompt_cache(dcache, t - read)
        table.append(row)
        mx.eval(bundle.draft.propose(bundle.model, mx.array([[seq[t], mask]]), features[:, read:t], dcache))
        read = t
    return {"prompt_tokens": len(prompt), "accepted": table, "temperature": temperature}


class Load:
    """Spells of load in replayed time: ``spells`` = ``(every, length, lo, hi)``, gaps and lengths
    exponential with means ``every`` and ``length`` seconds, each spell slowing every round by a
    factor uniform in ``[lo, hi]`` (None: no load). ``factor()`` is the one now, ``advance`` moves on."""

    def __init__(self, spells=None, seed=2):
        self.spells, self.rng = spells, random.Random(seed)
        self.now, self.start, self.end, self.slower = 0.0, 0.0, 0.0, 1.0

    def factor(self) -> float:
        if not self.spells:
            return 1.0
        every, length, lo, hi = self.spells
        while self.now >= self.end:  # the next spell
            self.start = self.end + self.rng.expovariate(1 / every)
            self.end = self.start + self.rng.expovariate(1 / length)
            self.slower = self.rng.uniform(lo, hi)
        return self.slower if self.now >= self.start else 1.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


def kept_drafts(rec, t, w, draws):
    """Drafts kept by a round of width ``w`` at answer token ``t`` and, when sampled, each
    one's probability of being kept (``draws[t]``: the uniforms that decide them)."""
    entry = rec["accepted"][t][w - 2]
    if isinstance(entry, int):
        return entry, None
    kept = 0
    while kept < w - 1 and draws[t][kept] < entry[kept]:
        kept += 1
    return kept, entry


def replay(rec, schedule, truth: Costs, timed: bool = False, noise: float = 0.0, rng=None, draws=None,
           load=None, bias: float = 1.0) -> float:
    """Tokens/s after the first token of ``schedule`` (an int: a fixed width) on one recorded
    prompt; ``timed``: the schedule is told each round's seconds (times a log-normal factor
    of spread ``noise``, as timing on a shared machine); ``draws``: the uniforms deciding sampled
    drafts; ``load``: a ``Load`` slowing rounds; ``bias``: drafted rounds are told as that many
    times their time (learned costs gone wrong)."""
    table, context = rec["accepted"], rec["prompt_tokens"]
    t, seconds, unread = 0, 0.0, context
    while t < len(table):
        w = min(schedule if isinstance(schedule, int) else schedule.width, len(table) - t)
        kept, expected = kept_drafts(rec, t, w, draws) if w > 1 else (0, None)
        committed = kept + 1
        took = truth.round_s(w, context + t)
        if w > 1:
            took += truth.catch_up_s(unread)
            unread = committed
        else:
            unread += 1
        if load is not None:
            took *= load.factor()
            load.advance(took)
        seconds += took
        if not isinstance(schedule, int):
            schedule.update(committed, w, context + t + committed, expected)
            if timed:
                told = took * (bias if w > 1 else 1.0)
                schedule.observe(told * math.exp(rng.gauss(0, noise)) if noise else told)
        t += committed
    return len(table) / seconds


def uniforms(recs, sets):
    """``sets`` draws for every prompt: a uniform per answer token and block position."""
    rng = random.Random(1)
    return [[[[rng.random() for _ in WIDTHS] for _ in r["accepted"]] for r in recs] for _ in range(sets)]


def structure(recs) -> str:
    """How the first draft's acceptance (a round of width 2) varies: its mean, the share of its
    variance that lies between prompts, and its autocorrelation along an answer by lag in tokens
    (what a controller estimating it online can follow)."""
    seqs = [[float(row[0][0]) if isinstance(row[0], list) else float(row[0]) for row in r["accepted"]]
            for r in recs if len(r["accepted"]) > 64]
    if not seqs:
        return "no answer over 64 tokens"
    flat = [a for s in seqs for a in s]
    mean, var = statistics.mean(flat), statistics.pvariance(flat)
    between = statistics.pvariance([statistics.mean(s) for s in seqs]) / var
    lags = (1, 2, 4, 8, 16, 32)
    corr = [statistics.mean((s[i] - mean) * (s[i + lag] - mean) for s in seqs for i in range(len(s) - lag)) / var
            for lag in lags]
    return (f"first draft kept: mean {mean:.3f}, {between:.0%} of its variance between prompts; autocorrelation "
            + ", ".join(f"lag {lag} {c:.2f}" for lag, c in zip(lags, corr)) + f" ({len(seqs)} answers over 64 tokens)")


def fixed(recs, truth, width, draws, spells):
    """Tokens/s of fixed ``width`` on each prompt, for each set of ``draws`` in turn."""
    busy = Load(spells)
    return [replay(r, width, truth, draws=d and d[i], load=busy) for d in draws for i, r in enumerate(recs)]


def controlled(recs, truth, costs, start, memory, noise=None, acceptance=None, trust=0.0, draws=(None,), spells=None,
               bias=1.0):
    """Tokens/s of ``CostAware`` from ``start`` (trusted by ``trust``) on each prompt in turn, for
    each set of ``draws`` in turn, its ``costs`` and ``acceptance`` (when given) kept from prompt
    to prompt as on a bundle; rounds timed with ``noise`` (and ``bias``) unless None."""
    rng, busy, out = random.Random(0), Load(spells), []
    for d in draws:
        for i, r in enumerate(recs):
            s = CostAware(start, costs, 8, r["prompt_tokens"], r["prompt_tokens"], len(r["accepted"]),
                          memory=memory, acceptance=acceptance, trust=trust)
            out.append(replay(r, s, truth, noise is not None, noise or 0.0, rng, d and d[i], busy, bias))
    return out


def skewed(costs: Costs, factor: float) -> Costs:
    """``costs`` with every drafted round ``factor`` times as dear (width 1 is the first column)."""
    return replace(costs, verify_s=[[row[0]] + [v * factor for v in row[1:]] for row in costs.verify_s],
                   draft_s=[[v * factor for v in row] for row in costs.draft_s])


def tables(path, mode):
    """The tables' file, gzip-compressed when its name ends in .gz."""
    return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="write acceptance tables of the prompts here (JSON; .json.gz: compressed)")
    parser.add_argument("--replay", help="replay schedules on these tables (.json or .json.gz)")
    parser.add_argument("--prompts", action="append", default=None, help="CATEGORY=FILE (repeatable)")
    parser.add_argument("--limit", type=int, default=8, help="prompts per file")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP prompts of each file")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temp", type=float, default=0.0, help="record sampled answers at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="the sampled answers' seed")
    parser.add_argument("--draws", type=int, default=3, help="sets of draws deciding sampled drafts (run in turn)")
    parser.add_argument("--spells", help="EVERY,LENGTH,LO,HI: spells of load (mean seconds apart, mean seconds long, "
                        "slowdown range), e.g. 20,2,1.2,1.5")
    parser.add_argument("--skew", type=float, default=1.0, help="the controller's calibration prices drafted rounds "
                        "this many times their cost")
    parser.add_argument("--bias", type=float, default=1.0, help="the controller is told drafted rounds took this many "
                        "times their time (learned costs off, as measured: 0.9-1.1)")
    parser.add_argument("--truth", help="real round seconds at widths 1-8 (JSON list); default: the calibration")
    parser.add_argument("--memory", default="0.9", help="CostAware memories to replay")
    parser.add_argument("--trust", default="0", help="CostAware trusts in the start width to replay")
    parser.add_argument("--calibration", help="the controller's costs from this calibration.json (default: the bundle's)")
    parser.add_argument("--noise", type=float, default=0.15,
                        help="log-normal spread of the round times the controller sees (real drafted rounds here: 0.13-0.16)")
    args = parser.parse_args()
    if bool(args.record) == bool(args.replay):
        parser.error("give one of --record OUT or --replay IN")
    bundle = load(ensure_bundle())
    if args.record:
        sources = args.prompts or ["chat=/work/runs/prompts/heldout.jsonl", "code=/work/runs/prompts/code_heldout.jsonl"]
        jobs = []
        for category, path in map(prompt_source, sources):
            jobs += [(category, p) for p in load_prompts(path, limit=args.skip + args.limit)[args.skip :]]
        recs = []
        for category, text in tqdm(jobs, desc="recording"):
            rec = record(bundle, encode_prompt(bundle.tokenizer, text), args.max_tokens, args.temp, args.seed)
            recs.append(dict(rec, category=category))
        with tables(args.record, "wt") as f:
            json.dump(recs, f)
        return
    with tables(args.replay, "rt") as f:
        recs = json.load(f)
    costs = read_costs(args.calibration) if args.calibration else calibrate(bundle)
    truth = costs
    if args.truth:
        seconds = json.load(open(args.truth))
        truth = Costs(list(range(1, 9)), [costs.contexts[0]], [seconds], [[0.0] * 8], costs.read_s[:1])
    sampled = any(r.get("temperature", 0) > 0 for r in recs)
    print(structure(recs) + "\n")
    draws = uniforms(recs, args.draws) if sampled else [None]
    spells = tuple(map(float, args.spells.split(","))) if args.spells else None
    seen = skewed(costs, args.skew)  # what the controller is told
    rows = {f"B={w}": fixed(recs, truth, w, draws, spells) for w in (1, 2, 3, 4)}
    n = len(recs)
    best = [max((1, 2, 3, 4), key=lambda w: statistics.mean(rows[f"B={w}"][i::n])) for i in range(n)]
    rows["oracle (best fixed per prompt)"] = [rows[f"B={best[k % n]}"][k] for k in range(len(rows["B=1"]))]
    for memory, trust in itertools.product(map(float, args.memory.split(",")), map(float, args.trust.split(","))):
        for start in (2, 3):
            name = f"CostAware memory {memory} trust {trust} from B={start}"
            run = dict(draws=draws, spells=spells, trust=trust, bias=args.bias)
            rows[name] = controlled(recs, truth, seen, start, memory, **run)
            rows[name + ", timed rounds"] = controlled(recs, truth, LearnedCosts(seen), start, memory, args.noise,
                                                       **run)
            rows[name + ", timed rounds, session acceptance"] = controlled(
                recs, truth, LearnedCosts(seen), start, memory, args.noise, session_acceptance(), **run)
    plain = rows["B=1"]
    cats = [r["category"] for _ in draws for r in recs]
    categories = sorted(set(cats))
    print("| schedule | all | " + " | ".join(categories) + " |\n|---|---:|" + "---:|" * len(categories))
    for name, speeds in rows.items():
        ratios = [s / p for s, p in zip(speeds, plain)]
        by = [statistics.mean(x for x, c in zip(ratios, cats) if c == category) for category in categories]
        print(f"| {name} | {statistics.mean(ratios):.3f}x | " + " | ".join(f"{v:.3f}x" for v in by) + " |")


if __name__ == "__main__":
    main()
