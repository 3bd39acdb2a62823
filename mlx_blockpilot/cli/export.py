"""``python -m mlx_blockpilot.export``: a bundle for vLLM or SGLang, with the launch command."""

import sys

from ..bundle import load, write_bundle
from ..dtypes import DTYPES
from ..exporter import ENGINES, export
from ..prompts import encode_prompt, load_prompts
from .common import add_limit_arg, parser, run


def build_parser():
    p = parser("export", __doc__.split(": ", 1)[1])
    p.add_argument("bundle", help="a converted bundle directory")
    p.add_argument("--to", required=True, choices=ENGINES, help="the serving engine")
    p.add_argument("--out", required=True, help="the directory to create")
    p.add_argument("--prompts", help="sample prompts: the block size is the policy's most frequent pick over them")
    add_limit_arg(p)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only after success)")
    return p


def _export(args) -> int:
    bundle = load(args.bundle)
    prompts = None
    if args.prompts:
        prompts = [encode_prompt(bundle.tokenizer, t) for t in load_prompts(args.prompts, limit=args.limit)]
    with write_bundle(args.out, args.force) as tmp:  # written aside, renamed at the end
        info = export(bundle, tmp, args.to, args.dtype, prompts)
    print(f"block size {info.block_size}: {info.block_size_reason}", file=sys.stderr)
    print(f"cd {args.out} && {info.command}")
    return 0


def main(argv=None) -> int:
    return run(build_parser, _export, argv)
