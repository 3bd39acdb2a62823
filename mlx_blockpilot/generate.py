"""Generate with a bundle (the public API) and ``python -m mlx_blockpilot.generate``."""

import argparse
import json
import sys
from typing import Any, Dict, List, Sequence, Union

from . import decode
from .bundle import Bundle, load
from .decode import GenerationResponse
from .errors import BlockPilotError

Prompt = Union[str, Sequence[int]]


def chat_prompt(bundle: Bundle, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` under the target's chat template, ready for the assistant turn."""
    tok = bundle.tokenizer
    if not getattr(tok, "has_chat_template", False):
        raise BlockPilotError("the target's tokenizer has no chat template; pass a plain prompt instead")
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


def _with_defaults(bundle: Bundle, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    kwargs.setdefault("block_size", bundle.default_block_size)
    kwargs.setdefault("policy", bundle.policy)
    return kwargs


def stream_generate(bundle: Bundle, prompt: Prompt, **kwargs):
    """Yield a ``GenerationResponse`` per round (options: ``decode.stream_generate``).

    ``block_size`` defaults to ``"auto"`` (the policy) when the bundle has one,
    otherwise to the drafter's training block size.
    """
    return decode.stream_generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_defaults(bundle, kwargs))


def generate(bundle: Bundle, prompt: Prompt, **kwargs) -> GenerationResponse:
    """Generate to the end; the returned response holds all text and tokens."""
    return decode.generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_defaults(bundle, kwargs))


def block_size_arg(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer or 'auto', got {value!r}") from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model BUNDLE or --target DIR --draft DIR [--policy DIR] (shared by the CLIs)."""
    parser.add_argument("--model", help="a converted bundle directory (default: the offline SmolLM2 demo)")
    parser.add_argument("--target", help="an mlx-lm target model directory")
    parser.add_argument("--draft", help="a DFlash drafter directory (z-lab layout)")
    parser.add_argument("--policy", help="a BlockPilot policy directory")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--block-size", type=block_size_arg, default=None, help="N >= 1 or 'auto' (the policy)")
    parser.add_argument("--refine", action="store_true", help="move the block size round by round (lossless)")


def resolve_model_args(args) -> None:
    """No --model, --target or --draft: use the offline SmolLM2 demo (built on first use)."""
    if not (args.model or args.target or args.draft):
        from .demo import ensure_bundle

        args.model = str(ensure_bundle())


def load_from_args(args):
    """The bundle the CLI arguments name (the demo when they name none)."""
    resolve_model_args(args)
    if args.model:
        return load(args.model, policy=args.policy)
    if not (args.target and args.draft):
        raise BlockPilotError("give --model BUNDLE, or both --target DIR and --draft DIR")
    return load(target=args.target, draft=args.draft, policy=args.policy)


def sampling_kwargs(args) -> dict:
    kw = dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.block_size is not None:
        kw["block_size"] = args.block_size
    if getattr(args, "refine", False):
        kw["refine"] = True
    return kw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_blockpilot.generate", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompt", required=True)
    add_sampling_args(parser)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    args = parser.parse_args(argv)
    try:
        if not args.prompt.strip():
            raise BlockPilotError("the prompt is empty; pass some text with --prompt")
        bundle = load_from_args(args)
        if args.no_chat_template or not bundle.tokenizer.has_chat_template:
            prompt = bundle.tokenizer.encode(args.prompt)
        else:
            prompt = chat_prompt(bundle, [{"role": "user", "content": args.prompt}])
        if args.json:
            r = generate(bundle, prompt, **sampling_kwargs(args))
            print(json.dumps(response_json(r, bundle)))
        else:
            r = None
            for r in stream_generate(bundle, prompt, **sampling_kwargs(args)):
                print(r.text, end="", flush=True)
            print()
            print(stats_line(r), file=sys.stderr)
    except BlockPilotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


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
        "mean_acceptance": r.mean_acceptance,
        "prefill_s": r.prefill_s,
        "policy_s": r.policy_s,
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "peak_memory_gb": r.peak_memory_gb,
        "bundle": str(bundle.path) if bundle.path else None,
    }


if __name__ == "__main__":
    sys.exit(main())
