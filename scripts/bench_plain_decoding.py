"""Plain decoding (B=1) through our loop against mlx-lm's generate_step, interleaved.

    scripts/with-openblas python scripts/bench_plain_decoding.py --repeats 5

Decode tokens/s after the first token, on the demo bundle, greedy and at T=0.7; prints the
medians and the ratios (ours / mlx-lm).
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_lm_step
from mlx_lm.sample_utils import make_sampler

from mlx_blockpilot.bundle import load
from mlx_blockpilot.decode import generate_step
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.options import GenerationOptions
from mlx_blockpilot.prompts import encode_prompt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Write a short story about a robot learning to paint.")
    args = parser.parse_args()
    bundle = load(ensure_bundle())
    prompt = encode_prompt(bundle.tokenizer, args.prompt)
    n = args.max_tokens

    def mlx_lm(temp):
        steps = mlx_lm_step(mx.array(prompt), bundle.model, max_tokens=n, sampler=make_sampler(temp))
        next(steps)
        tic = time.perf_counter()
        for _ in steps:
            pass
        return (n - 1) / (time.perf_counter() - tic)

    def ours(temp):
        opts = GenerationOptions(max_tokens=n, block_size=1, temperature=temp, refine=False, seed=0)
        steps = generate_step(bundle.model, bundle.draft, prompt, opts)
        next(steps)
        tic = time.perf_counter()
        count = sum(len(s.tokens) for s in steps)
        return count / (time.perf_counter() - tic)

    rows = {}
    for _ in range(args.repeats):
        for temp in (0.0, 0.7):
            rows.setdefault(("mlx-lm", temp), []).append(mlx_lm(temp))
            rows.setdefault(("ours B=1", temp), []).append(ours(temp))
    for (name, temp), v in rows.items():
        print(f"{name:9s} T={temp}: median {statistics.median(v):6.2f} tok/s  {[round(x, 2) for x in v]}")
    for temp in (0.0, 0.7):
        ratio = statistics.median(rows[("ours B=1", temp)]) / statistics.median(rows[("mlx-lm", temp)])
        print(f"T={temp}: ours / mlx-lm = {ratio:.3f}")


if __name__ == "__main__":
    main()
