"""Calibrated round costs against real decoding rounds, interleaved in one process.

    scripts/with-openblas python scripts/check_calibration.py --repeats 3

On the demo bundle: the calibration's timings at context 256 (median of 3 per width) and the
median round time of real greedy decoding at fixed block sizes 1-3 on one prompt, alternated
``--repeats`` times so that both see the same machine; prints both and the B=2 / plain ratios.
"""

import argparse
import statistics
import time

from mlx_blockpilot.bundle import load
from mlx_blockpilot.costs import measure
from mlx_blockpilot.decode import generate_step
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.options import GenerationOptions
from mlx_blockpilot.prompts import encode_prompt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="Write a long story about a robot learning to paint, with many details. " * 8)
    args = parser.parse_args()
    bundle = load(ensure_bundle())
    prompt = encode_prompt(bundle.tokenizer, args.prompt)

    def real_round_s(width):
        opts = GenerationOptions(max_tokens=64, block_size=width, refine=False)
        steps = generate_step(bundle.model, bundle.draft, prompt, opts)
        next(steps)
        times, tic = [], time.perf_counter()
        for _ in steps:
            now = time.perf_counter()
            times.append(now - tic)
            tic = now
        return statistics.median(times)

    print(f"prompt: {len(prompt)} tokens; ms per round at B = 1 / 2 / 3")
    for _ in range(args.repeats):
        costs = measure(bundle.model, bundle.draft, widths=(1, 2, 3, 4), contexts=(256,), reps=3)
        calibrated = [costs.round_s(w, 256) for w in (1, 2, 3)]
        real = [real_round_s(w) for w in (1, 2, 3)]
        print("calibrated " + " / ".join(f"{t * 1e3:.1f}" for t in calibrated)
              + " | real " + " / ".join(f"{t * 1e3:.1f}" for t in real)
              + f" | B=2 / plain: calibrated {calibrated[1] / calibrated[0]:.2f}, real {real[1] / real[0]:.2f}")


if __name__ == "__main__":
    main()
