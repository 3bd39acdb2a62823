"""Decoding after a long prompt: mlx-lm, our fixed block sizes (plain: 1) and our default, interleaved.

    scripts/with-openblas python scripts/bench_long_context.py --context-lengths 4096,8000 --repeats 3
    scripts/with-openblas python scripts/bench_long_context.py --context-lengths 4096,8000 --temp 0.7 --seed 0

The long prompt (held-out chat prompts quoted to about N tokens, as ``bench --context-lengths``
builds it) is prefilled once per length: every run starts from the same target cache holding
all but the prompt's last token, and our runs from a drafter that has read none of it (as on a
first turn), so repeats cost decoding only, not minutes of prefill. The rows run in a rotating
order (each first in turn). Our default runs as the API runs a session (costs learned from its
rounds, acceptance carried from one generation to the next, over the repeats and lengths in
turn). Prints decode tokens/s after the first token (medians), the ratios to mlx-lm, whether our
tokens equal mlx-lm's (greedy; with ``--temp`` every run samples, mlx-lm with its sampler, from
seed ``--seed`` + the repeat), and the widths our default chose.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_lm_step
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_blockpilot.api import costs_for
from mlx_blockpilot.bundle import load
from mlx_blockpilot.decode import generate_step, make_cache
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.options import GenerationOptions
from mlx_blockpilot.prompts import load_prompts, long_prompt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="/work/runs/prompts/heldout.jsonl")
    parser.add_argument("--context-lengths", default="4096,8000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-sizes", default="1", help="our fixed block sizes to run beside the default "
                        "(comma-separated; 1: plain decoding)")
    parser.add_argument("--temp", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="the sampled runs' seed (plus the repeat)")
    parser.add_argument("--out", default=None, help="write the runs here (JSON) and a PNG beside it")
    args = parser.parse_args()
    bundle = load(ensure_bundle())
    model, draft, n = bundle.model, bundle.draft, args.max_tokens
    greedy = GenerationOptions(temperature=args.temp).greedy
    sizes = [int(b) for b in args.block_sizes.split(",") if b]
    costs = costs_for(bundle, refine=True)  # as the API runs a session: learned costs and acceptance
    texts = load_prompts(args.prompts)
    results = []
    for length in (int(x) for x in args.context_lengths.split(",")):
        prompt = long_prompt(bundle.tokenizer, texts, length)
        cache = make_cache(model, draft)
        tic = time.perf_counter()
        for _ in generate_step(model, draft, prompt, GenerationOptions(max_tokens=1, block_size=1), prompt_cache=cache):
            pass
        print(f"{len(prompt)} prompt tokens prefilled in {time.perf_counter() - tic:.0f} s", flush=True)
        features = cache.pending
        mx.eval(features)
        kept = len(prompt) - 1

        def reset():  # the target holds all but the last prompt token; the drafter has read none of it
            trim_prompt_cache(cache.target, cache.target[0].offset - kept)
            del cache.tokens[kept:]
            cache.draft, cache.pending = draft.make_cache(), features[:, :kept]

        def mlx_lm(seed):
            reset()
            mx.random.seed(seed)
            steps = mlx_lm_step(mx.array(prompt[kept:]), model, max_tokens=n, prompt_cache=cache.target,
                                sampler=make_sampler(args.temp))
            tokens = [next(steps)[0]]
            tic = time.perf_counter()
            tokens += [t for t, _ in steps]
            return (len(tokens) - 1) / (time.perf_counter() - tic), [], tokens

        def ours(block_size, refine, seed):
            reset()
            opts = GenerationOptions(max_tokens=n, block_size=block_size, refine=refine, temperature=args.temp,
                                     seed=seed)
            steps = generate_step(model, draft, prompt, opts, policy=bundle.policy, prompt_cache=cache,
                                  costs=costs if refine else None, acceptance=bundle.acceptance if refine else None)
            tokens = list(next(steps).tokens)
            tic = time.perf_counter()
            widths = []
            for s in steps:
                widths.append(s.width)
                tokens += s.tokens
            return (len(tokens) - 1) / (time.perf_counter() - tic), widths, tokens

        rows = {"mlx-lm": mlx_lm}
        for b in sizes:
            rows[f"ours B={b}"] = lambda seed, b=b: ours(b, False, seed)
        rows["ours auto+control"] = lambda seed: ours("auto", True, seed)
        speeds = {name: [] for name in rows}
        for rep in range(args.repeats):
            names = list(rows)
            names = names[rep % len(names):] + names[:rep % len(names)]  # each row in each place in turn
            runs = {name: rows[name](args.seed + rep) for name in names}
            for name in rows:
                tps, widths, tokens = runs[name]
                # greedy: ours must equal mlx-lm's tokens (EOS is not a stop here); sampled: not compared
                same = tokens == runs["mlx-lm"][2] if greedy else None
                speeds[name].append(tps)
                results.append(dict(context=len(prompt), config=name, repeat=rep, tokens_per_s=tps, widths=widths,
                                    same_tokens=same))
                print(f"{len(prompt)} {name:18s} {tps:6.2f} tok/s  same tokens {same}  widths {widths}", flush=True)
        for name, v in speeds.items():
            ratios = against_mlx_lm(results, name, len(prompt))
            print(f"{len(prompt)} tokens: {name:18s} median {statistics.median(v):6.2f} tok/s; against mlx-lm's run of "
                  f"the same repeat: median {statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})  "
                  f"{[round(x, 2) for x in v]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        title = "Decoding after a long prompt" + ("" if greedy else f" (T = {args.temp:g})")
        plot(results, args.out.rsplit(".", 1)[0] + ".png", title)


def against_mlx_lm(results, config, context) -> list:
    """``config``'s tokens/s over mlx-lm's in the same repeat, by repeat (the two ran one after the
    other: a slow spell of the machine mostly cancels out of the ratio)."""
    runs = {(r["config"], r["repeat"]): r["tokens_per_s"] for r in results if r["context"] == context}
    return [t / runs["mlx-lm", rep] for (c, rep), t in runs.items() if c == config]


def plot(results, path, title="Decoding after a long prompt"):
    """The median of ``against_mlx_lm`` by context length (bars: the lowest and highest repeat), one
    line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in results})
    fig, ax = plt.subplots(figsize=(6, 4))
    configs = list(dict.fromkeys(r["config"] for r in results))
    for k, config in enumerate(configs):
        ratios = [against_mlx_lm(results, config, c) for c in contexts]
        mid = [statistics.median(v) for v in ratios]
        spread = [[m - min(v) for m, v in zip(mid, ratios)], [max(v) - m for m, v in zip(mid, ratios)]]
        shift = (k - (len(configs) - 1) / 2) * 0.01 * (contexts[-1] - contexts[0] or 1)  # bars side by side
        ax.errorbar([c + shift for c in contexts], mid, yerr=spread, fmt="o-", capsize=3, label=config)
    ax.axhline(0.97, color="tab:red", lw=1, ls="--", label="3% slower than mlx-lm")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode tokens/s / mlx-lm's (median, range of repeats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
