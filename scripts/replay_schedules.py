"""Schedules replayed on recorded acceptance: noise-free tokens/s by width rule.

    scripts/with-openblas python scripts/replay_schedules.py --record acc.json --limit 8
    scripts/with-openblas python scripts/replay_schedules.py --replay acc.json --truth real_round_s.json

Greedy output does not depend on the schedule, so one plain decoding per prompt gives the
tokens, one target pass over prompt + answer their features, and one drafter pass per answer
position and width (2 to 8) how many drafts a round starting there would keep (checked against
real rounds: identical). ``--replay`` then runs fixed widths, the per-prompt oracle over them
and ``schedule.CostAware`` (with each ``--memory`` and ``--trust``) on that table: on the
calibration alone, told each round's time (as decoding does with ``costs.LearnedCosts``; times
scattered by ``--noise``), and also starting each prompt from the acceptance of the ones before (a
session). What a round costs comes from ``--truth`` (real round seconds by width 1-8 as a
JSON list, measured elsewhere) or else the calibration (``--calibration`` or the bundle's).
On this shared CPU a 1-2% difference between schedules is lost in the noise of real runs;
here it is not.
"""

import argparse
import itertools
import json
import math
import random
import statistics

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache
from tqdm import tqdm

from mlx_blockpilot.bundle import load
from mlx_blockpilot.cli.bench import prompt_source
from mlx_blockpilot.costs import Costs, LearnedCosts, calibrate, read_costs
from mlx_blockpilot.decode import generate_step, make_cache, prefill
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.draft import target_tokens
from mlx_blockpilot.options import GenerationOptions
from mlx_blockpilot.prompts import encode_prompt, load_prompts
from mlx_blockpilot.schedule import CostAware, session_acceptance

WIDTHS = range(2, 9)


def record(bundle, prompt, max_tokens):
    """``accepted[t][w - 2]``: drafts kept by a round of width ``w`` whose last committed token is answer token ``t``."""
    eos = set(bundle.tokenizer.eos_token_ids)
    opts = GenerationOptions(max_tokens=max_tokens, block_size=1, refine=False)
    seq = prompt + [t for step in generate_step(bundle.model, bundle.draft, prompt, opts, eos=eos) for t in step.tokens]
    features = prefill(bundle.model, bundle.draft, make_cache(bundle.model, bundle.draft), seq).hidden
    dcache, mask, read, table = bundle.draft.make_cache(), bundle.draft.config.mask_token_id, 0, []
    for t in range(len(prompt), len(seq) - 1):
        row = []
        for w in WIDTHS:  # the drafter reads the features before `t` (then taken back), drafts w - 1
            block = mx.array([[seq[t]] + [mask] * (w - 1)])
            choices = mx.argmax(bundle.draft.propose(bundle.model, block, features[:, read:t], dcache), axis=-1)
            drafted = target_tokens(bundle.draft.draft_ids(), choices).tolist()
            trim_prompt_cache(dcache, t - read)
            kept = 0
            while kept < w - 1 and t + 1 + kept < len(seq) and drafted[kept] == seq[t + 1 + kept]:
                kept += 1
            row.append(kept)
        table.append(row)
        mx.eval(bundle.draft.propose(bundle.model, mx.array([[seq[t], mask]]), features[:, read:t], dcache))
        read = t
    return {"prompt_tokens": len(prompt), "accepted": table}


def replay(rec, schedule, truth: Costs, timed: bool = False, noise: float = 0.0, rng=None) -> float:
    """Tokens/s after the first token of ``schedule`` (an int: a fixed width) on one recorded
    prompt; ``timed``: the schedule is told each round's seconds (times a log-normal factor
    of spread ``noise``, as timing on a shared machine)."""
    table, context = rec["accepted"], rec["prompt_tokens"]
    t, seconds, unread = 0, 0.0, context
    while t < len(table):
        w = min(schedule if isinstance(schedule, int) else schedule.width, len(table) - t)
        committed = table[t][w - 2] + 1 if w > 1 else 1
        took = truth.round_s(w, context + t)
        if w > 1:
            took += truth.catch_up_s(unread)
            unread = committed
        else:
            unread += 1
        seconds += took
        if not isinstance(schedule, int):
            schedule.update(committed, w, context + t + committed)
            if timed:
                schedule.observe(took * math.exp(rng.gauss(0, noise)) if noise else took)
        t += committed
    return len(table) / seconds


def controlled(recs, truth, costs, start, memory, noise=None, acceptance=None, trust=0.0):
    """Tokens/s of ``CostAware`` from ``start`` (trusted by ``trust``) on each prompt in turn, its
    ``costs`` and ``acceptance`` (when given) kept from prompt to prompt as on a bundle; rounds
    timed with ``noise`` unless None."""
    rng = random.Random(0)
    out = []
    for r in recs:
        s = CostAware(start, costs, 8, r["prompt_tokens"], r["prompt_tokens"], len(r["accepted"]), memory=memory,
                      acceptance=acceptance, trust=trust)
        out.append(replay(r, s, truth, noise is not None, noise or 0.0, rng))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="write acceptance tables of the prompts here (JSON)")
    parser.add_argument("--replay", help="replay schedules on these tables")
    parser.add_argument("--prompts", action="append", default=None, help="CATEGORY=FILE (repeatable)")
    parser.add_argument("--limit", type=int, default=8, help="prompts per file")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP prompts of each file")
    parser.add_argument("--max-tokens", type=int, default=128)
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
            recs.append(dict(record(bundle, encode_prompt(bundle.tokenizer, text), args.max_tokens), category=category))
        with open(args.record, "w") as f:
            json.dump(recs, f)
        return
    recs = json.load(open(args.replay))
    costs = read_costs(args.calibration) if args.calibration else calibrate(bundle)
    truth = costs
    if args.truth:
        seconds = json.load(open(args.truth))
        truth = Costs(list(range(1, 9)), [costs.contexts[0]], [seconds], [[0.0] * 8], costs.read_s[:1])
    rows = {f"B={w}": [replay(r, w, truth) for r in recs] for w in (1, 2, 3, 4)}
    rows["oracle (best fixed per prompt)"] = [max(rows[f"B={w}"][i] for w in (1, 2, 3, 4)) for i in range(len(recs))]
    for memory, trust in itertools.product(map(float, args.memory.split(",")), map(float, args.trust.split(","))):
        for start in (2, 3):
            name = f"CostAware memory {memory} trust {trust} from B={start}"
            rows[name] = controlled(recs, truth, costs, start, memory, trust=trust)
            rows[name + ", timed rounds"] = controlled(recs, truth, LearnedCosts(costs), start, memory, args.noise,
                                                       trust=trust)
            rows[name + ", timed rounds, session acceptance"] = controlled(
                recs, truth, LearnedCosts(costs), start, memory, args.noise, session_acceptance(), trust)
    plain = rows["B=1"]
    categories = sorted({r["category"] for r in recs})
    print("| schedule | all | " + " | ".join(categories) + " |\n|---|---:|" + "---:|" * len(categories))
    for name, speeds in rows.items():
        ratios = [s / p for s, p in zip(speeds, plain)]
        by = [statistics.mean(x for x, r in zip(ratios, recs) if r["category"] == c) for c in categories]
        print(f"| {name} | {statistics.mean(ratios):.3f}x | " + " | ".join(f"{v:.3f}x" for v in by) + " |")


if __name__ == "__main__":
    main()
