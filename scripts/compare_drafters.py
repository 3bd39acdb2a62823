"""Real greedy decoding with several drafters on held-out prompts, interleaved per prompt.

    scripts/with-openblas python scripts/compare_drafters.py --target T --drafts A B \
        --prompts chat=/work/runs/prompts/heldout.jsonl --prompts code=/work/runs/prompts/code_heldout.jsonl \
        --limit 10 --block-sizes 3,4 --max-tokens 128 --out OUT.json

For each prompt, mlx-lm's greedy tokens first (the reference), then every drafter at every
block size one after the other (``decode.generate``, a fixed block size): so all see the same
machine. Prints pooled mean acceptance (tokens per target forward) and the median decode
tok/s per drafter, block size and prompt set, and checks every output against mlx-lm's.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from tqdm import tqdm

from mlx_blockpilot.bundle import load_target
from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import load_draft
from mlx_blockpilot.prompts import encode_prompt, load_prompts


def mlx_lm_greedy(model, prompt, max_tokens, eos):
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(tok))
        if out[-1] in eos:
            break
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="an mlx-lm target directory (e.g. the demo bundle's target/)")
    p.add_argument("--drafts", nargs="+", required=True, help="drafter directories")
    p.add_argument("--prompts", action="append", required=True, metavar="NAME=FILE")
    p.add_argument("--limit", type=int, default=10, help="prompts per set")
    p.add_argument("--block-sizes", default="3,4")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="write the per-prompt results here (JSON)")
    args = p.parse_args()
    model, tokenizer = load_target(args.target)
    drafts = {d: load_draft(d) for d in args.drafts}
    sizes = [int(b) for b in args.block_sizes.split(",")]
    sets = {}
    for spec in args.prompts:
        name, _, path = spec.partition("=")
        sets[name] = [encode_prompt(tokenizer, t) for t in load_prompts(path, limit=args.limit)]
    eos = set(tokenizer.eos_token_ids)
    rows, mismatches = [], 0
    jobs = [(name, i, prompt) for name, prompts in sets.items() for i, prompt in enumerate(prompts)]
    for name, i, prompt in tqdm(jobs, desc="prompts"):
        ref = mlx_lm_greedy(model, prompt, args.max_tokens, eos)
        for d, draft in drafts.items():
            for b in sizes:
                tic = time.perf_counter()
                r = generate(model, draft, tokenizer, prompt, block_size=b, max_tokens=args.max_tokens)
                same = r.tokens == ref
                mismatches += not same
                rows.append({"set": name, "prompt": i, "draft": d, "block_size": b, "same_as_mlx_lm": same,
                             "acceptance_lengths": r.acceptance_lengths, "decode_tokens_per_s": r.decode_tokens_per_s,
                             "wall_s": time.perf_counter() - tic})
    summary = []
    for name in list(sets) + ["all"]:
        for d in drafts:
            for b in sizes:
                sel = [r for r in rows if r["draft"] == d and r["block_size"] == b and name in (r["set"], "all")]
                lengths = [a for r in sel for a in r["acceptance_lengths"]]
                summary.append({"set": name, "draft": d, "block_size": b,
                                "mean_acceptance": sum(lengths) / max(len(lengths), 1),
                                "median_decode_tok_s": statistics.median(r["decode_tokens_per_s"] for r in sel)})
                print(f"{name:6s} B={b}  AL {summary[-1]['mean_acceptance']:.3f}  "
                      f"{summary[-1]['median_decode_tok_s']:.2f} tok/s  {d}")
    print(f"outputs different from mlx-lm's: {mismatches} of {len(rows)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": rows}, f, indent=1)
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
