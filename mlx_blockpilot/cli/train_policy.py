"""``python -m mlx_blockpilot.train_policy``: learn a BlockPilot policy from a sweep."""

import json
import sys
from pathlib import Path

from ..dtypes import DTYPES, check_quantization
from ..errors import BlockPilotError
from ..policy import PolicyConfig, quantize_policy, save_policy
from ..training.policy_trainer import (
    OBJECTIVES,
    check_target,
    evaluate,
    format_report,
    plot_report,
    predict,
    read_data,
    split,
    train,
)
from .common import block_sizes_arg, output_dir, parser, run


def build_parser():
    p = parser("train_policy", __doc__.split(": ", 1)[1])
    p.add_argument("--sweep", required=True, help="a sweep .jsonl from python -m mlx_blockpilot.sweep")
    p.add_argument("--out", required=True, help="the policy directory to write")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="acceptance")
    p.add_argument("--input", choices=["logits", "hidden"], default="logits")
    p.add_argument("--block-sizes", type=block_sizes_arg, default=None,
                   help="candidate sizes (default: all in the sweep), e.g. 14-18")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved policy")
    p.add_argument("--q-bits", type=int, default=None, help="quantize the first layer (4 or 8) when saving")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--target", help="check the policy fits this target directory before training")
    p.add_argument("--force", action="store_true", help="write into an --out that exists and is not empty")
    p.add_argument("--costs", help="a calibration.json (python -m mlx_blockpilot.calibrate): the throughput "
                                   "objective predicts tokens/s from acceptance and these round costs")
    return p


def _train_policy(args) -> int:
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise BlockPilotError(f"--out {out} exists and is not empty (a bundle?); pass --force to write into it")
    costs = None
    if args.costs and args.objective != "throughput":
        raise BlockPilotError("--costs turns acceptance into tokens/s for --objective throughput; drop it or use that objective")
    if args.costs:
        from ..costs import read_costs

        costs = read_costs(args.costs)
    data = read_data(args.sweep, args.input, args.block_sizes, costs)
    config = PolicyConfig(args.input, data.features.shape[1], args.hidden_size, args.num_layers, data.block_sizes)
    if args.target:
        check_target(data, args.input, args.target)
    if args.q_bits is not None:
        check_quantization(args.q_bits, args.q_group_size, "policy", config.input_size)
    train_rows, test_rows = split(len(data.ids), args.holdout, args.seed)
    with output_dir(out, "--out"):  # checked before training, not after it
        labels = data.labels(args.objective)
        policy = train(
            data.features[train_rows], labels[train_rows], config, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            dropout=args.dropout, seed=args.seed,
        )
        policy.set_dtype(DTYPES[args.dtype])
        if args.q_bits is not None:
            quantize_policy(policy, args.q_bits, args.q_group_size)
        save_policy(policy, out)  # the report below is of the policy as saved
        if len(test_rows):
            report = evaluate(data, test_rows, predict(policy, data.features[test_rows]), args.objective, train_rows)
            report["held_out_ids"] = [data.ids[i] for i in test_rows]
            (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_report(report, out / "report.png")
            print(format_report(report))
    print(f"policy written to {out} (block sizes {data.block_sizes})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(build_parser, _train_policy, argv)
