"""``python -m mlx_blockpilot.sweep``: decode every prompt at every candidate block size (a policy's training data)."""

import sys

from ..prompts import load_prompts
from ..training.sweep import sweep
from ..training.sweep_file import check_features
from .common import (
    add_limit_arg,
    add_model_args,
    add_sampling_args,
    block_sizes_arg,
    check_file_output,
    load_from_args,
    options_from_args,
    parser,
    run,
)


def build_parser():
    p = parser("sweep", __doc__.split(": ", 1)[1])
    add_model_args(p)
    p.add_argument("--prompts", required=True, help=".txt, .jsonl, ShareGPT .json, or 'sharegpt' (installed)")
    add_limit_arg(p)
    p.add_argument("--max-chars", type=int, default=None, help="skip longer prompts")
    p.add_argument("--block-sizes", type=block_sizes_arg, default=block_sizes_arg("12-20"), help="e.g. 2-8,16 (default 12-20)")
    add_sampling_args(p, block_size=False)
    p.add_argument("--features", default="logits", help="logits or logits,hidden")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--refine", action="store_true", help="refine the block size per round from each start size")
    p.add_argument("--out", required=True, help="the sweep .jsonl (resumed if it exists)")
    return p


def _sweep(args) -> int:
    features = check_features([f.strip() for f in args.features.split(",") if f.strip()])
    options_from_args(args)  # bad sampling values fail before any file is touched
    check_file_output(args.out, "--out")
    prompts = load_prompts(args.prompts, limit=args.limit, max_chars=args.max_chars)
    bundle = load_from_args(args)
    done = sweep(
        bundle.model, bundle.draft, bundle.tokenizer, prompts, args.block_sizes, args.out,
        max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed if args.seed is not None else 0,
        features=features, chat=not args.no_chat_template, refine=args.refine,
    )
    print(
        f"{args.out}: {done['prompts']} prompts, {done['runs']} new runs"
        + (f", {done['skipped_too_long']} prompts skipped (too long for the context)" if done["skipped_too_long"] else ""),
        file=sys.stderr,
    )
    return 0


def main(argv=None) -> int:
    return run(build_parser, _sweep, argv)
