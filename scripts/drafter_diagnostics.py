"""Two checks of the drafter trainer on distilled data (an OUT/data folder of train_draft).

``fit``: train a drafter on a few sequences and report the teacher-forced acceptance on those
same sequences. If training and the estimate agree (positions, labels, mask), it climbs
towards the block size; if it stays flat while the loss falls, something is misaligned.

``throughput``: seconds per training step and predicted positions per second for several
(block size, blocks per sequence, batch) shapes, to see what dense anchors buy.

    scripts/with-openblas python scripts/drafter_diagnostics.py fit --target T --data D \
        --init-from mlx_blockpilot/assets/smollm2-demo/draft --start 2800 --count 16 --steps 200 --out OUT
    scripts/with-openblas python scripts/drafter_diagnostics.py throughput --target T --data D \
        --init-from mlx_blockpilot/assets/smollm2-demo/draft --shapes 6x24x8 6x64x8 6x128x8 4x128x8
"""

import argparse
import statistics

import numpy as np

from mlx_blockpilot.bundle import load_target
from mlx_blockpilot.draft import load_draft
from mlx_blockpilot.training import distill, draft_trainer


def fit(args, model, tokenizer, examples):
    seqs = examples[args.start : args.start + args.count]
    print(f"{len(seqs)} sequences, {sum(e.answer_len for e in seqs)} answer tokens")
    draft = load_draft(args.init_from)
    records = draft_trainer.train(model, tokenizer, draft, seqs, args.out, args.steps, batch_size=8, blocks_per_seq=24,
                                  lr=1e-3, warmup=20, gamma=3, val_examples=seqs, eval_every=50,
                                  eval_block_size=args.eval_block_size, progress=False, weight_decay=0.0)
    for r in records:
        if "val_acceptance" in r:
            hits = " / ".join(f"{h:.2f}" for h in r["val_position_hit_rate"])
            print(f"step {r['step']:>4}: acceptance on the training sequences {r['val_acceptance']:.3f} (hit rates {hits})")


def throughput(args, model, tokenizer, examples):
    usable = [i for i, e in enumerate(examples) if e.answer_len >= 2]
    for shape in args.shapes:
        B, per_seq, batch = (int(x) for x in shape.split("x"))
        draft = load_draft(args.init_from)
        draft.config.block_size = B
        records = draft_trainer.train(model, tokenizer, draft, examples, f"{args.out}/{shape}", 8, batch_size=batch,
                                      blocks_per_seq=per_seq, gamma=3, progress=False)
        s = statistics.median(r["s"] for r in records if "s" in r and r["step"] > 2)
        rng = np.random.default_rng(0)
        positions = statistics.mean(
            int(draft_trainer.sample_batch(examples, rng.choice(usable, batch), per_seq, B, draft.config.mask_token_id, rng)["valid"].sum())
            for _ in range(5))
        print(f"B={B} blocks/seq={per_seq} batch={batch}: {s:.2f} s/step, {positions:.0f} positions/step, "
              f"{positions / s:.0f} positions/s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["fit", "throughput"])
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True, help="a train_draft OUT/data folder")
    p.add_argument("--init-from", required=True, help="the drafter to start from")
    p.add_argument("--out", default="/tmp/drafter_diagnostics")
    p.add_argument("--start", type=int, default=0, help="fit: first sequence")
    p.add_argument("--count", type=int, default=16, help="fit: sequences")
    p.add_argument("--steps", type=int, default=200, help="fit: training steps")
    p.add_argument("--eval-block-size", type=int, default=4)
    p.add_argument("--shapes", nargs="+", default=["6x24x8", "6x64x8", "6x128x8", "4x128x8"],
                   help="throughput: BLOCKxBLOCKS_PER_SEQxBATCH")
    args = p.parse_args()
    model, tokenizer = load_target(args.target)
    examples = distill.load_data(args.data)
    (fit if args.check == "fit" else throughput)(args, model, tokenizer, examples)


if __name__ == "__main__":
    main()
