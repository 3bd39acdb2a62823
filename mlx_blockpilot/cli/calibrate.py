"""``python -m mlx_blockpilot.calibrate``: measure what a round costs on this machine for a bundle."""

import json
import sys

from ..costs import LearnedCosts, cache_path, calibrate
from .common import add_model_args, load_from_args, parser, run


def build_parser():
    p = parser("calibrate", __doc__.split(": ", 1)[1])
    add_model_args(p)
    p.add_argument("--force", action="store_true", help="measure again even when a calibration is cached")
    p.add_argument("--json", action="store_true", help="print the measured costs as JSON")
    return p


def table(costs) -> str:
    lines = ["| context | " + " | ".join(f"B={w}" for w in costs.widths) + " | drafter reads the context |",
             "|---:|" + "---:|" * (len(costs.widths) + 1)]
    for length in costs.contexts:
        lines.append(f"| {length} | " + " | ".join(f"{costs.round_s(w, length) * 1e3:.1f}" for w in costs.widths)
                     + f" | {costs.catch_up_s(length) * 1e3:.1f} |")
    if costs.sample_s:
        lines.append("| sampling (T > 0) adds | " + " | ".join(f"{s * 1e3:.1f}" for s in costs.sample_s) + " | |")
    return "\n".join(lines)


def _calibrate(args) -> int:
    bundle = load_from_args(args)
    measured = []
    costs = calibrate(bundle, force=args.force, progress=lambda msg: (measured.append(msg), print(msg, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(costs.to_dict()))
    else:
        print("round cost in ms (verify + draft) by context length and block size B (B=1: plain decoding),\n"
              "and what the drafter's first read of that many unseen features adds to a round")
        print(table(costs))
        learned = LearnedCosts(costs)  # the corrections kept: how widths compare, apart from the load
        by_text = {}  # what was learned -> the context lengths it holds at
        for length in sorted(costs.corrections):
            relative = [f"x{learned.ratio(w, length) / learned.ratio(1, length):.2f} at B={w}"
                        for w in sorted(costs.corrections[length]) if w > 1]
            if relative:
                by_text.setdefault(", ".join(relative), []).append(str(length))
        if by_text:
            print("decoding has timed real rounds: against a plain step they cost " + "; ".join(
                f"{text} after {', '.join(lengths)} tokens" for text, lengths in by_text.items())
                  + " of what these costs say; the controller starts from that (--force measures again and forgets it)")
    how = "measured now" if measured else "cached; --force measures again"
    print(f"calibration: {cache_path(bundle)} ({how}; measuring took {costs.seconds:.1f} s)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(build_parser, _calibrate, argv)
