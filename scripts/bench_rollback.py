"""What rolling back a hybrid target's linear-attention layers costs per decoding round.

A random Qwen3.5-style hybrid (GatedDeltaNet layers, every second layer full attention)
and a dense Qwen3 of the same width and depth decode the same prompt with scripted
drafters, interleaved, so that each round keeps a known number of its B inputs:

- ``all kept``: the drafter proposes the target's continuation (no rollback);
- ``1 kept``: it is always wrong (the rollback re-runs 1 position);
- ``B-1 kept``: right except for its last token (the rollback re-runs B-1 positions).

Reports the median seconds per round and the ratio to the dense target's round:

    scripts/with-openblas python scripts/bench_rollback.py --hidden 512 --layers 8 --block-size 4
"""

import argparse
import importlib
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from mlx_blockpilot.bench.drafters import ScriptedDraft
from mlx_blockpilot.decode import generate
from mlx_blockpilot.draft import DraftConfig


class LastWrong(ScriptedDraft):
    """The true continuation except for the block's last draft."""

    def propose(self, model, block, context_hidden, cache):
        logits = super().propose(model, block, context_hidden, cache)
        return mx.concatenate([logits[:-1], mx.roll(logits[-1:], 1, axis=-1)])


def build(kind, hidden, layers, vocab):
    base = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
                num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                rms_norm_eps=1e-6, vocab_size=vocab, rope_theta=10000.0, max_position_embeddings=4096,
                tie_word_embeddings=True)
    if kind == "qwen3":
        config = dict(base, model_type="qwen3")
    else:
        text = dict(base, model_type="qwen3_5_text", linear_num_value_heads=hidden // 64, linear_num_key_heads=hidden // 128,
                    linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, full_attention_interval=2,
                    rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "type": "default"})
        config = dict(model_type="qwen3_5", text_config=text)
    module = importlib.import_module(f"mlx_lm.models.{kind}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    B = args.block_size
    tok = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(
        {f"w{i}": i for i in range(args.vocab)}, unk_token="w0"))))
    tok.eos_token_ids = []
    prompt = list(range(7, 7 + 40))
    cfg = DraftConfig(hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=args.vocab, target_layer_ids=(1,), mask_token_id=0,
                      num_target_layers=args.layers)
    models, drafters = {}, {}
    for kind in ("qwen3", "qwen3_5"):
        models[kind] = model = build(kind, args.hidden, args.layers, args.vocab)
        ref = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=args.tokens + 1)]
        drafters[kind] = {"all kept": ScriptedDraft(cfg, prompt + ref, args.vocab),
                          "1 kept": ScriptedDraft(cfg, prompt + ref, args.vocab, wrong=True),
                          f"{B - 1} kept": LastWrong(cfg, prompt + ref, args.vocab)}
    times = {}
    for rep in range(args.repeats + 1):  # interleaved, so machine noise hits every row alike
        for kind, model in models.items():
            for name, draft in drafters[kind].items():
                tic = time.perf_counter()
                r = generate(model, draft, tok, prompt, block_size=B, max_tokens=args.tokens)
                elapsed = time.perf_counter() - tic - r.prefill_s
                if rep:  # the first pass warms up
                    times.setdefault((kind, name), []).append(elapsed / len(r.acceptance_lengths))
    rows = {k: statistics.median(v) for k, v in times.items()}
    print(f"| round (B={B}) | dense Qwen3, ms | hybrid Qwen3.5, ms | hybrid / dense |")
    print("|---|---:|---:|---:|")
    for name in drafters["qwen3"]:
        d, h = rows[("qwen3", name)], rows[("qwen3_5", name)]
        print(f"| {name} | {d * 1e3:.1f} | {h * 1e3:.1f} | {h / d:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
