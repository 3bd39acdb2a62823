"""``python -m mlx_blockpilot.convert``: a target, a DFlash drafter and optionally a BlockPilot policy -> one MLX bundle.

    python -m mlx_blockpilot.convert --target Qwen/Qwen3-4B --draft z-lab/Qwen3-4B-DFlash-b16 \\
        --policy model.pt --out qwen3-4b-bundle --quantize --q-bits 4
"""

import argparse
import signal
import threading

from ..conversion import convert
from ..dtypes import DTYPES, QUANT_BITS, QUANT_GROUP_SIZES
from ..errors import BlockPilotError
from .common import EXIT_INTERRUPTED, block_sizes_arg, fail, parser


def _bits(value: str):
    if value == "none":
        return value
    if value in [str(b) for b in QUANT_BITS]:
        return int(value)
    raise argparse.ArgumentTypeError(f"bits must be {', '.join(map(str, QUANT_BITS))} or none, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = parser("convert", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--target", required=True, help="HF model directory or repo id, or a .gguf file")
    p.add_argument("--draft", required=True, help="DFlash drafter directory (z-lab layout) or repo id")
    p.add_argument("--policy", help="BlockPilot model.pt / .safetensors, or a converted policy directory")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--quantize", action="store_true", help="quantize the target (and the drafter) with mlx")
    p.add_argument("--q-bits", type=int, choices=QUANT_BITS, default=None, help="bits for --quantize (default 4)")
    p.add_argument("--q-group-size", type=int, choices=QUANT_GROUP_SIZES, default=64)
    p.add_argument("--draft-q-bits", type=_bits, default=None, help="4, 8 or none (default: like the target)")
    p.add_argument("--policy-q-bits", type=_bits, default=None, help="quantize the policy's first layer: 4, 8 or none")
    p.add_argument("--policy-block-sizes", type=block_sizes_arg, default=None,
                   help="block size of each policy class, e.g. 14-18 (the official default)")
    p.add_argument("--policy-input", choices=("logits", "hidden"), default="logits",
                   help="what the policy reads (official: logits)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weight dtype (default: the source's; a GGUF target is dequantized to it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only after success)")
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BlockPilotError as e:
        return fail(e)
    old_handler = None
    if threading.current_thread() is threading.main_thread():  # clean up on kill too
        old_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.q_bits is not None and not args.quantize:
            raise BlockPilotError("--q-bits only applies with --quantize; add --quantize or drop --q-bits")
        convert(
            args.target, args.draft, args.out, args.policy,
            quantize=args.quantize, q_bits=args.q_bits or 4, q_group_size=args.q_group_size,
            draft_q_bits={None: "auto", "none": None}.get(args.draft_q_bits, args.draft_q_bits),
            policy_q_bits=None if args.policy_q_bits == "none" else args.policy_q_bits,
            policy_block_sizes=args.policy_block_sizes, policy_input_kind=args.policy_input,
            dtype=args.dtype, force=args.force,
        )
    except BlockPilotError as e:
        return fail(e)
    except OSError as e:
        return fail(BlockPilotError(f"cannot write the bundle ({e})"))
    except KeyboardInterrupt:
        fail(BlockPilotError("interrupted; nothing was written"))
        return EXIT_INTERRUPTED
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return 0
