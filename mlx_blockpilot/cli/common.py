"""What every command shares: the model and sampling flags, one block-size list syntax,
the prompt-count flag, and one error epilogue (``error: ...`` on one line, exit code 2)."""

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from ..errors import BlockPilotError
from ..options import AUTO, DEFAULT_MAX_TOKENS, GenerationOptions, OptionError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# The flag each generation option comes from, for error messages.
OPTION_FLAGS = {
    "max_tokens": "--max-tokens",
    "temperature": "--temp",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "block_size": "--block-size",
}


class UsageError(BlockPilotError):
    """Command-line arguments argparse could not parse."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are ``UsageError``s: one ``error:`` line, exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser(command: str, description: str) -> Parser:
    return Parser(prog=f"python -m mlx_blockpilot.{command}", description=description)


def fail(error: BaseException) -> int:
    """Print ``error`` as one ``error:`` line on stderr; the exit code for bad input."""
    message = " ".join(str(error).split())
    if isinstance(error, OptionError) and error.option in OPTION_FLAGS and OPTION_FLAGS[error.option] not in message:
        message = f"{OPTION_FLAGS[error.option]}: {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def run(build: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], Optional[int]], argv=None) -> int:
    """Parse ``argv`` and run ``body``; bad input becomes one error line and exit code 2."""
    try:
        return body(build().parse_args(argv)) or 0
    except BlockPilotError as e:
        return fail(e)


# ----------------------------------------------------------------------------- outputs


def check_writable(directory, flag: str) -> Path:
    """Raise now, before any work, unless files can be written into ``directory`` (made if needed)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BlockPilotError(f"{flag} {directory} exists and is not a directory; choose another {flag}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise BlockPilotError(f"cannot write into {directory} ({e.strerror or e}); choose another {flag}") from None
    return directory


@contextmanager
def output_dir(directory, flag: str, keep: Sequence[str] = ()) -> Iterator[Path]:
    """``check_writable(directory)`` for a command's output; if the command stops with a
    ``BlockPilotError`` and the directory did not exist before, it is removed again (nothing
    half-written), unless it already holds work worth keeping (any of the names in ``keep``)."""
    directory = Path(directory)
    existed = directory.exists()
    check_writable(directory, flag)
    try:
        yield directory
    except BlockPilotError:
        if not existed and not any((directory / name).exists() for name in keep):
            shutil.rmtree(directory, ignore_errors=True)
        raise


def check_file_output(path, flag: str) -> Path:
    """Raise now unless ``path`` (a file to write or append to) can be written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise BlockPilotError(f"the folder of {flag} {path} does not exist; create it or choose another {flag}")
    if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
        raise BlockPilotError(f"{flag} {path} is a directory or not writable; choose another {flag}")
    check_writable(path.parent, f"the folder of {flag}")
    return path


# ----------------------------------------------------------------------------- value types


def block_size_arg(value: str):
    """``N`` (>= 1) or ``auto``."""
    if value == AUTO:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer or 'auto', got {value!r}") from None


def parse_block_sizes(spec: str) -> List[int]:
    """``"2-8,16"`` -> sorted unique sizes (each >= 1); the one block-size list syntax."""
    sizes = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                sizes.update(range(lo, hi + 1))
            else:
                sizes.add(int(part))
        except ValueError:
            raise BlockPilotError(f"block sizes must look like 2-8,16, got {spec!r}") from None
    if not sizes or min(sizes) < 1:
        raise BlockPilotError(f"block sizes must be integers >= 1, got {spec!r}")
    return sorted(sizes)


def block_sizes_arg(spec: str) -> List[int]:
    try:
        return parse_block_sizes(spec)
    except BlockPilotError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def token_counts_arg(spec: str) -> List[int]:
    """A comma-separated list of token counts >= 1, e.g. ``2048,4096,8000`` (no ranges)."""
    try:
        counts = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts such as 2048,4096,8000, got {spec!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {spec!r}")
    return counts


# ----------------------------------------------------------------------------- shared flags


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model BUNDLE or --target DIR --draft DIR [--policy DIR]."""
    p.add_argument("--model", help="a converted bundle directory (default: the offline SmolLM2 demo)")
    p.add_argument("--target", help="an mlx-lm target model directory")
    p.add_argument("--draft", help="a DFlash drafter directory (z-lab layout)")
    p.add_argument("--policy", help="a BlockPilot policy directory")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = DEFAULT_MAX_TOKENS, block_size: bool = True) -> None:
    """--max-tokens --temp --top-p --top-k --seed (and --block-size --refine); defaults are
    ``GenerationOptions``'s."""
    d = GenerationOptions()
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temp", type=float, default=d.temperature, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 disables it")
    p.add_argument("--seed", type=int, default=d.seed)
    if block_size:
        p.add_argument("--block-size", type=block_size_arg, default=None,
                       help="N >= 1 or 'auto' (the policy; the default when the model has one)")
        p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                       help="pick each round's width from this machine's measured costs (lossless; "
                            "default: on with --block-size auto, off with a fixed size)")


def add_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")


def options_from_args(args, **overrides) -> GenerationOptions:
    """The generation options the sampling flags ask for (checked now, before any loading)."""
    kw = dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if getattr(args, "block_size", None) is not None:
        kw["block_size"] = args.block_size
    if getattr(args, "refine", None) is not None:
        kw["refine"] = args.refine
    kw.update(overrides)
    return GenerationOptions(**kw)


def option_kwargs(options: GenerationOptions) -> dict:
    """``options`` as keyword arguments of ``generate``/``stream_generate`` (unset block size left out)."""
    kw = {k: getattr(options, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "refine")}
    if options.block_size is not None:
        kw["block_size"] = options.block_size
    return kw


def load_from_args(args):
    """The bundle the model flags name (the offline demo when they name none)."""
    from ..bundle import load

    if not (args.model or args.target or args.draft):
        from ..demo import ensure_bundle

        args.model = str(ensure_bundle())
    if args.model:
        return load(args.model, policy=args.policy)
    if not (args.target and args.draft):
        raise BlockPilotError("give --model BUNDLE, or both --target DIR and --draft DIR")
    return load(target=args.target, draft=args.draft, policy=args.policy)


def calibrate_if_needed(bundle, options: GenerationOptions) -> None:
    """Measure this machine's round costs now, with progress lines, if the options need them
    and no calibration is cached (``refine`` picks widths by expected tokens per second)."""
    from ..api import costs_for

    refine = options.resolve(bundle.draft.config.block_size, bundle.policy).refine
    costs_for(bundle, refine, progress=lambda msg: print(msg, file=sys.stderr, flush=True))


def check_auto(options: GenerationOptions, bundle) -> None:
    """Raise now if the options ask for ``auto`` and the bundle has no policy."""
    options.resolve(bundle.draft.config.block_size, bundle.policy)
