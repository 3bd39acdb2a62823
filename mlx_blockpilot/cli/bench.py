"""``python -m mlx_blockpilot.bench``: ours side by side with mlx-lm and the official DFlash MLX backend."""

import sys
from pathlib import Path

from ..bench.official import load_official
from ..bench.report import machine, markdown, write_outputs
from ..bench.runner import run_benchmark
from ..errors import BlockPilotError
from ..costs import cache_path, calibrate
from ..prompts import encode_prompt, load_prompts, long_prompt
from .common import (
    add_limit_arg,
    add_model_args,
    add_sampling_args,
    block_size_arg,
    output_dir,
    block_sizes_arg,
    load_from_args,
    options_from_args,
    parser,
    run,
    token_counts_arg,
)


def build_parser():
    p = parser("bench", __doc__.split(": ", 1)[1])
    add_model_args(p)
    p.add_argument("--prompts", required=True, action="append",
                   help="[CATEGORY=]SOURCE: .txt, .jsonl, ShareGPT .json, sharegpt or humaneval; repeat for categories")
    p.add_argument("--context-lengths", type=token_counts_arg, default=[],
                   help="also prompts of about these many tokens built from the first source, e.g. 2048,4096,8000")
    p.add_argument("--control", action="store_true",
                   help="add the per-round controller's rows (calibrates this machine first if needed)")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --control: calibrate now, not from the cache (the costs of the machine as it is)")
    add_limit_arg(p)
    add_sampling_args(p, max_tokens=64, block_size=False)
    p.add_argument("--block-sizes", type=block_sizes_arg, default=[1, 4, 8, 16], help="fixed sizes, e.g. 1,4,8,16 or 2-8")
    p.add_argument("--dflash-block-sizes", type=lambda v: [] if v in ("", "none") else block_sizes_arg(v), default=None,
                   help="block sizes for dflash.model_mlx (default: the fixed sizes >= 2; none to skip)")
    p.add_argument("--no-engine", action="store_true", help="skip the true-continuation engine rows")
    p.add_argument("--profile", type=block_size_arg, default=None, metavar="B",
                   help="also time draft / verify / host per round at block size B (adds syncs)")
    p.add_argument("--profile-prompts", type=int, default=2, help="profile on the first N prompts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=lambda v: [r.strip() for r in v.split(",") if r.strip()], default=None,
                   help='only these rows, e.g. "ours B=1,ours auto+control" (mlx-lm always runs)')
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    return p


def model_dirs(args):
    """The target and drafter directories being benchmarked (the official backend loads them itself)."""
    if args.model:
        return Path(args.target or Path(args.model) / "target"), Path(args.draft or Path(args.model) / "draft")
    return Path(args.target), Path(args.draft)


def prompt_source(spec: str):
    """``[CATEGORY=]SOURCE`` as ``(category, source)``; a source path that holds ``=`` stays whole."""
    name, sep, src = spec.partition("=")
    if not sep or Path(spec).exists() or not name or "/" in name:
        return "prompts", spec
    return name, src


def _bench(args, argv) -> int:
    if args.repeats < 1 or args.max_tokens < 2:
        raise BlockPilotError("--repeats must be >= 1 and --max-tokens >= 2")
    if any(b < 2 for b in args.dflash_block_sizes or []):
        raise BlockPilotError("block sizes for dflash must be >= 2")
    if args.profile is not None and (not isinstance(args.profile, int) or args.profile < 1):
        raise BlockPilotError("--profile takes a fixed block size >= 1")
    if args.recalibrate and not args.control:
        raise BlockPilotError("--recalibrate calibrates for the controller's rows: add --control")
    options_from_args(args)  # sampling values checked before anything loads
    sources = [prompt_source(spec) for spec in args.prompts]
    names = [name for name, _ in sources]
    if len(set(names)) < len(names):
        raise BlockPilotError(f"--prompts categories must differ, got {names}; name each source: --prompts NAME=SOURCE")
    texts = {name: load_prompts(src, limit=args.limit) for name, src in sources}
    with output_dir(args.out, "--out"):  # checked before the benchmark, not after it
        return _bench_into(args, argv, sources, texts)


def _bench_into(args, argv, sources, texts) -> int:
    bundle = load_from_args(args)
    target_dir, draft_dir = model_dirs(args)
    prompts, categories = [], []
    for name, chunk in texts.items():
        prompts += [encode_prompt(bundle.tokenizer, t, chat=not args.no_chat_template) for t in chunk]
        categories += [name] * len(chunk)
    if args.context_lengths:
        pool = load_prompts(sources[0][1])
        for n in args.context_lengths:
            prompts.append(long_prompt(bundle.tokenizer, pool, n, chat=not args.no_chat_template))
            categories.append(f"{n} tokens")
    costs = None
    if args.control:
        costs = calibrate(bundle, force=args.recalibrate, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    dsizes = [b for b in args.block_sizes if b >= 2] if args.dflash_block_sizes is None else args.dflash_block_sizes
    official = load_official(target_dir, draft_dir) if dsizes else None
    if dsizes and official is None:
        print("note: dflash is not installed (pip install --no-deps dflash==0.1.0); skipping its rows", file=sys.stderr)
    results = run_benchmark(
        bundle, prompts, block_sizes=args.block_sizes, dflash_block_sizes=dsizes, official=official,
        max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        repeats=args.repeats, engine=not args.no_engine, profile=args.profile, profile_prompts=args.profile_prompts,
        categories=categories if len(set(categories)) > 1 else None, costs=costs,
        costs_path=cache_path(bundle) if costs is not None else None, rows=args.rows,
    )
    results["command"] = "python -m mlx_blockpilot.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    results["machine"] = machine()
    results["prompts"] = {name: chunk for name, chunk in texts.items()}
    results["categories"] = categories
    results["model"] = {"target": str(target_dir), "draft": str(draft_dir)}
    files = write_outputs(results, Path(args.out))
    print(markdown(results))
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(build_parser, lambda args: _bench(args, argv), argv)
