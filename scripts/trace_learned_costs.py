"""What the controller's timed rounds teach ``costs.LearnedCosts``, beside what fixed-width runs
of the same prompts measure (decode seconds per round), interleaved prompt by prompt.

    scripts/with-openblas python scripts/trace_learned_costs.py \
        --prompts chat=heldout.jsonl --prompts code=code_heldout.jsonl --limit 4 --out trace.json

Per prompt: tokens/s of B=1, 2, 3 and of the controller (one LearnedCosts and one session
acceptance over the whole run, as a loaded bundle keeps them), and per width the fixed run's
round cost over the calibrated one beside the median of the controller's samples of that width.
"""

import argparse
import json
import statistics

from mlx_blockpilot import decode
from mlx_blockpilot.bundle import load
from mlx_blockpilot.cli.bench import prompt_source
from mlx_blockpilot.costs import LearnedCosts, calibrate
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.prompts import encode_prompt, load_prompts
from mlx_blockpilot.schedule import session_acceptance

FIXED = (1, 2, 3)


class RecordedCosts(LearnedCosts):
    """LearnedCosts that also keeps every observation ``(width, context, seconds, rounds)``."""

    def __init__(self, costs):
        super().__init__(costs)
        self.log = []

    def observe(self, width, context, seconds, rounds=1, sampled=False):
        self.log.append((width, context, seconds, rounds))
        super().observe(width, context, seconds, rounds, sampled)


def run(bundle, ids, max_tokens, **kw):
    """One generation: tokens/s, seconds per round, mid-answer context and acceptance."""
    for r in decode.stream_generate(bundle.model, bundle.draft, bundle.tokenizer, ids, max_tokens=max_tokens, **kw):
        pass
    per_round = (r.generation_tokens - 1) / r.decode_tokens_per_s / len(r.acceptance_lengths)
    return dict(tps=r.decode_tokens_per_s, round_s=per_round, ctx=len(ids) + r.generation_tokens // 2,
                acc=r.mean_acceptance)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", action="append", required=True, help="CATEGORY=FILE (repeatable)")
    parser.add_argument("--limit", type=int, default=4, help="prompts of each source")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", required=True, help="write the runs and the controller's samples here (JSON)")
    args = parser.parse_args(argv)
    bundle = load(ensure_bundle())
    costs = calibrate(bundle, force=True)
    learned, acceptance = RecordedCosts(costs), session_acceptance()
    texts = [t for _, src in map(prompt_source, args.prompts) for t in load_prompts(src, limit=args.limit)]
    rows = {name: [] for name in [f"B={w}" for w in FIXED] + ["control"]}
    for i, text in enumerate(texts):
        ids = encode_prompt(bundle.tokenizer, text)
        for w in FIXED:
            rows[f"B={w}"].append(run(bundle, ids, args.max_tokens, block_size=w, refine=False))
        seen = len(learned.log)
        rows["control"].append(run(bundle, ids, args.max_tokens, block_size=3, refine=True,
                                   costs=learned, acceptance=acceptance))
        print(i, {k: round(v[-1]["tps"], 2) for k, v in rows.items()}, flush=True)
        for w in FIXED:
            fixed = rows[f"B={w}"][-1]
            mine = [s / costs.round_s(ww, c) for ww, c, s, _ in learned.log[seen:] if ww == w]
            if mine:
                print(f"   w={w}: fixed ratio {fixed['round_s'] / costs.round_s(w, fixed['ctx']):.3f}"
                      f"  controller samples n={len(mine)} median {statistics.median(mine):.3f}")
    for name, v in rows.items():
        gain = statistics.mean(x["tps"] / y["tps"] for x, y in zip(v, rows["B=1"]))
        print(name, "median tok/s", round(statistics.median(x["tps"] for x in v), 2), "mean ratio to B=1", round(gain, 3))
    for w in FIXED:
        fixed = statistics.median(x["round_s"] / costs.round_s(w, x["ctx"]) for x in rows[f"B={w}"])
        context = statistics.median(x["ctx"] for x in rows[f"B={w}"])
        print("width", w, "learned ratio", round(learned.ratio(w, context), 3), "fixed median ratio", round(fixed, 3))
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, log=learned.log, costs=costs.to_dict()), f)


if __name__ == "__main__":
    main()
