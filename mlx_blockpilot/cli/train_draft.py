"""``python -m mlx_blockpilot.train_draft``: train a DFlash drafter for a target by self-distillation."""

import json
import math
import time
from pathlib import Path

import numpy as np

from ..draft import read_draft_config
from ..errors import BlockPilotError
from ..prompts import encode_prompt, load_prompts
from ..training import distill
from ..training.draft_trainer import (
    acceptance,
    check_shape,
    default_layer_ids,
    default_mask_id,
    init_draft,
    make_config,
    resolve_target,
    select_draft_vocab,
    set_draft_vocab,
    split_validation,
    train,
    warm_start,
)
from .. import target
from .common import add_limit_arg, block_sizes_arg, output_dir, parser, run


def build_parser():
    p = parser("train_draft", __doc__.split(": ", 1)[1])
    p.add_argument("--target", required=True, help="a bundle, an mlx-lm directory or a .gguf file")
    p.add_argument("--prompts", required=True, help="prompts file (.txt/.jsonl/ShareGPT .json) or 'sharegpt'")
    p.add_argument("--out", required=True, help="output directory (drafter, data/, checkpoint/, log)")
    add_limit_arg(p)
    p.add_argument("--holdout", type=int, default=4, help="last N prompts: never trained on, for acceptance")
    p.add_argument("--min-chars", type=int, default=20)
    p.add_argument("--max-chars", type=int, default=600)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--layers", type=int, default=1, help="drafter layers")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=None)
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--causal", action="store_true",
                   help="causal attention inside a block: any block size up to --block-size matches training")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="reduced draft vocabulary: the N most frequent answer tokens (saved as draft_vocab_size + d2t)")
    p.add_argument("--init-from", default=None, help="start from this drafter's weights (same shape, or fewer layers: it grows, new layers last, as identities) "
                        "and its vocabulary (a reduced one of the --draft-vocab size)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, default=16, help="prompts answered per batch")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None, help="passes over the sequences (batch rows)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--blocks-per-seq", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--gamma", type=float, default=None, help="loss weight decay (default B/2 - 1)")
    p.add_argument("--vocab-sample", type=int, default=8192,
                   help="softmax candidates per step (0 = full vocab; not used with --draft-vocab)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--soft-labels", type=int, default=0, metavar="K",
                   help="also distil the target's top-K distribution at every label (computed from the stored "
                        "features of the deepest tapped layer; 0 = hard labels only)")
    p.add_argument("--soft-weight", type=float, default=0.5, help="share of the soft labels in the loss (0..1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint (same --steps)")
    p.add_argument("--stop-after", type=int, default=None, help="end this run at that step (resume later)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts decoded at each evaluation (default: all of --holdout)")
    p.add_argument("--eval-block-size", type=int, default=None, help="block size of the evaluations (default --block-size)")
    p.add_argument("--val-sequences", type=int, default=0,
                   help="distilled sequences of the first data set kept out of training for a teacher-forced acceptance estimate")
    p.add_argument("--eval-block-sizes", type=lambda v: [] if v in ("", "none") else block_sizes_arg(v), default=[4, 8, 16],
                   help="final held-out report, e.g. 4,8 (none to skip)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-tokens", nargs="+", default=None, metavar="FILE",
                      help="train on the sequences of these token files (features rebuilt by prefill) instead of "
                           "generating answers; --prompts then only gives the held-out prompts")
    p.add_argument("--export-tokens", default=None, help="also write the distilled sequences as a token file")
    data.add_argument("--data", nargs="+", default=None, metavar="DIR",
                      help="train on the distilled data in these folders as it is (earlier runs' OUT/data); "
                           "--prompts then only gives the held-out prompts")
    p.add_argument("--no-progress", action="store_true")
    return p


def _train_draft(args) -> int:
    minimum = {"--holdout": 0, "--val-sequences": 0, "--batch": 1, "--blocks-per-seq": 1, "--gen-batch": 1,
               "--max-new-tokens": 1, "--eval-prompts": 1, "--eval-block-size": 2}
    for name, low in minimum.items():
        v = getattr(args, name[2:].replace("-", "_"))
        if v is not None and v < low:
            raise BlockPilotError(f"{name} must be >= {low}, got {v}")
    check_shape(args.layers, args.block_size)
    if args.soft_labels < 0 or not 0 <= args.soft_weight <= 1:
        raise BlockPilotError(f"--soft-labels must be >= 0 and --soft-weight in 0..1, got {args.soft_labels} and {args.soft_weight}")
    if args.soft_labels and args.draft_vocab is None and args.vocab_sample > 0:
        raise BlockPilotError("soft labels need a reduced draft vocabulary or the full softmax: "
                              "add --draft-vocab N or --vocab-sample 0")
    # a run that stops on bad input leaves no new --out behind, unless distillation already filled it
    with output_dir(args.out, "--out", keep=("data", "checkpoint")) as out:
        return _train_into(args, out)


def _train_into(args, out: Path) -> int:
    from tqdm import tqdm

    texts = load_prompts(args.prompts, limit=args.limit, min_chars=args.min_chars, max_chars=args.max_chars)
    model, tokenizer, target_dir = resolve_target(args.target, out)
    ids = [i for i in (encode_prompt(tokenizer, t) for t in texts) if 0 < len(i) <= args.max_prompt_tokens]
    if len(ids) <= args.holdout and not (args.data_tokens or args.data):
        raise BlockPilotError(f"{len(ids)} usable prompts leave none for training after --holdout {args.holdout}")
    train_ids, held = ids[: len(ids) - args.holdout], ids[len(ids) - args.holdout :] if args.holdout else []

    layer_ids = args.target_layer_ids or default_layer_ids(target.num_layers(model))
    mask_id = args.mask_token_id if args.mask_token_id is not None else default_mask_id(tokenizer)
    cfg = make_config(model, args.layers, layer_ids, args.block_size, mask_id, args.causal or None, args.draft_vocab)
    draft = init_draft(model, cfg, args.seed)  # before distilling: a bad --init-from fails fast
    source = read_draft_config(args.init_from)[0] if args.init_from else None
    if args.init_from:
        warm_start(draft, args.init_from)

    data_dirs = [Path(d) for d in args.data] if args.data else [out / "data"]
    tic = time.perf_counter()
    gen = {"prompts": 0, "tokens": 0, "answer_tokens": 0}
    if args.data:
        for data_dir in data_dirs:
            meta = distill.read_meta(data_dir)
            if meta is None:
                raise BlockPilotError(f"--data {data_dir} holds no distilled data (no {distill.META})")
            if meta["target_layer_ids"] != list(layer_ids):
                raise BlockPilotError(f"--data {data_dir} was captured at target layers {meta['target_layer_ids']}, "
                                      f"not {list(layer_ids)}; pass --target-layer-ids {' '.join(map(str, meta['target_layer_ids']))}")
        stream, bar = iter(()), tqdm(total=0, disable=True)
    elif args.data_tokens:
        sequences = [s for f in args.data_tokens for s in distill.read_token_file(f)]
        stream = distill.featurize(model, sequences, data_dirs[0], layer_ids, args.gen_batch)
        bar = tqdm(total=len(sequences), desc="features", disable=args.no_progress, unit="seq")
    else:
        stream = distill.distill(model, train_ids, data_dirs[0], layer_ids, args.max_new_tokens, args.gen_batch,
                                 tokenizer.eos_token_ids)
        bar = tqdm(total=len(train_ids), desc="distill", disable=args.no_progress, unit="prompt")
    if not args.data:
        bar.update(len((distill.read_meta(data_dirs[0]) or {}).get("done", [])))
    for s in stream:
        for k in gen:
            gen[k] += s[k]
        bar.update(s["prompts"])
        bar.set_postfix(tok_s=f"{gen['answer_tokens'] / (time.perf_counter() - tic):.1f}")
    bar.close()
    gen_s = time.perf_counter() - tic
    sets = [distill.load_data(data_dir) for data_dir in data_dirs]
    examples = [e for one in sets for e in one]
    if args.export_tokens:
        distill.write_token_file(examples, args.export_tokens, {"target": str(args.target), "prompts": str(args.prompts),
                                                                "max_new_tokens": args.max_new_tokens})
    examples, val = split_validation(sets, args.val_sequences)
    answer_tokens = sum(e.answer_len for e in examples)
    steps = args.steps
    if steps is None:
        epochs = args.epochs if args.epochs is not None else 1.0
        steps = max(1, math.ceil(epochs * len(examples) / args.batch))

    if cfg.draft_vocab_size is not None and (source is None or source.draft_vocab_size != cfg.draft_vocab_size):
        set_draft_vocab(draft, select_draft_vocab(examples, cfg.draft_vocab_size, cfg.vocab_size, tokenizer.eos_token_ids))
    records = train(
        model, tokenizer, draft, examples, out, steps,
        batch_size=args.batch, blocks_per_seq=args.blocks_per_seq, lr=args.lr, warmup=args.warmup,
        gamma=args.gamma, vocab_sample=args.vocab_sample, seed=args.seed, resume=args.resume,
        checkpoint_every=args.checkpoint_every, eval_prompts=held[: args.eval_prompts], eval_every=args.eval_every,
        eval_tokens=args.eval_tokens, progress=not args.no_progress, stop_after=args.stop_after,
        val_examples=val, eval_block_size=args.eval_block_size, weight_decay=args.weight_decay,
        soft_k=args.soft_labels, soft_weight=args.soft_weight,
    )
    final = {b: acceptance(model, draft, tokenizer, held, b, args.eval_tokens) for b in args.eval_block_sizes}
    step_s = [r["s"] for r in records if "s" in r]
    summary = {
        "target": str(target_dir),
        "sequences": len(examples),
        "answer_tokens": answer_tokens,
        "tokens": int(sum(len(e.tokens) for e in examples)),
        "distill_s": gen_s if gen["answer_tokens"] else None,
        "distill_answer_tok_s": gen["answer_tokens"] / gen_s if gen["answer_tokens"] else None,
        "steps": steps,
        "s_per_step": float(np.median(step_s)) if step_s else None,
        "held_out_prompts": len(held),
        "held_out_acceptance": {str(b): a for b, a in final.items()},
        "config": {k: v for k, v in vars(args).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("sequences", "answer_tokens", "distill_answer_tok_s", "steps", "s_per_step", "held_out_acceptance")}))
    return 0


def main(argv=None) -> int:
    return run(build_parser, _train_draft, argv)
