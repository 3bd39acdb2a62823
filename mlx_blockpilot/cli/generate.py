"""``python -m mlx_blockpilot.generate``: generate an answer to one prompt."""

import json
import sys

from ..api import generate, stream_generate
from ..errors import BlockPilotError
from ..prompts import check_text, encode_prompt
from .common import add_model_args, add_sampling_args, calibrate_if_needed, check_auto, load_from_args, option_kwargs, options_from_args, parser, run


def build_parser():
    p = parser("generate", __doc__.split(": ", 1)[1])
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    add_sampling_args(p)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def stats_line(r) -> str:
    return (
        f"[{r.generation_tokens} tokens, {r.decode_tokens_per_s:.1f} tok/s, block size {r.block_size}, "
        f"mean acceptance {r.mean_acceptance:.2f}, prefill {r.prefill_s:.2f}s]"
    )


def response_json(r, bundle) -> dict:
    return {
        "text": r.text,
        "tokens": r.tokens,
        "prompt_tokens": r.prompt_tokens,
        "generation_tokens": r.generation_tokens,
        "finish_reason": r.finish_reason,
        "block_size": r.block_size,
        "acceptance_lengths": r.acceptance_lengths,
        "round_widths": r.round_widths,
        "mean_acceptance": r.mean_acceptance,
        "prefill_s": r.prefill_s,
        "policy_s": r.policy_s,
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "peak_memory_gb": r.peak_memory_gb,
        "bundle": str(bundle.path) if bundle.path else None,
    }


def _generate(args) -> int:
    if not check_text(args.prompt, "--prompt").strip():
        raise BlockPilotError("the prompt is empty; pass some text with --prompt")
    options = options_from_args(args)
    bundle = load_from_args(args)
    check_auto(options, bundle)
    calibrate_if_needed(bundle, options)
    prompt = encode_prompt(bundle.tokenizer, args.prompt, chat=not args.no_chat_template)
    if args.json:
        r = generate(bundle, prompt, **option_kwargs(options))
        print(json.dumps(response_json(r, bundle)))
        return 0
    r = None
    for r in stream_generate(bundle, prompt, **option_kwargs(options)):
        print(r.text, end="", flush=True)
    print()
    print(stats_line(r), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(build_parser, _generate, argv)
