"""``python -m mlx_blockpilot.chat``: multi-turn chat in the terminal.

The KV caches stay alive across turns: each turn the whole templated conversation is
passed to the decoder, which reuses the longest prefix already in the cache and
prefills only the rest. Ctrl-C stops the current answer (between two decoding rounds,
so the cache stays consistent) and keeps the part already shown.
"""

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from mlx_lm.utils import common_prefix_len

from .decode import GenerationResponse, make_cache
from .errors import BlockPilotError
from .generate import add_model_args, add_sampling_args, chat_prompt, load_from_args, sampling_kwargs, stats_line, stream_generate
from .sampling import SamplingParams
from .target import max_context

HELP = """commands:
  /reset   forget the conversation (keeps the system prompt)
  /stats   statistics of the last answer and of the session
  /help    this help
  /quit    leave (or Ctrl-D)
Ctrl-C stops the current answer."""


@dataclass
class Turn:
    """What one answer cost and how speculation went."""

    response: GenerationResponse
    reused_tokens: int
    interrupted: bool


@dataclass
class Chat:
    """A conversation with a loaded bundle; the prompt cache lives as long as it does."""

    bundle: object
    system: Optional[str] = None
    options: Dict = field(default_factory=dict)
    messages: List[Dict[str, str]] = field(default_factory=list)
    turns: List[Turn] = field(default_factory=list)

    def __post_init__(self):
        if not getattr(self.bundle.tokenizer, "has_chat_template", False):
            raise BlockPilotError("the target's tokenizer has no chat template, which chat needs")
        self.cache = make_cache(self.bundle.model, self.bundle.draft)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the cache is trimmed lazily by the next turn."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(
        self,
        text: str,
        on_text: Callable[[str], None] = lambda s: None,
        stop: Optional[threading.Event] = None,
    ) -> Turn:
        """Answer ``text``, streaming pieces to ``on_text``; ``stop`` ends the answer early."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = chat_prompt(self.bundle, messages)
        context = max_context(self.bundle.model)
        if context is not None and len(ids) >= context:
            raise BlockPilotError(
                f"the conversation has {len(ids)} tokens, the model's context is {context}; /reset starts over"
            )
        reused = min(common_prefix_len(self.cache.tokens, ids), len(ids) - 1)
        options = dict(self.options)
        if options.get("seed") is not None:
            options["seed"] += len(self.turns)  # reproducible sessions, different draws per turn
        pieces, r = [], None
        gen = stream_generate(self.bundle, ids, prompt_cache=self.cache, **options)
        try:
            for r in gen:
                pieces.append(r.text)
                on_text(r.text)
                if stop is not None and stop.is_set():
                    break
        finally:
            gen.close()  # at a yield point: the cache holds exactly the committed tokens
        interrupted = r.finish_reason is None
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
        turn = Turn(r, reused, interrupted)
        self.turns.append(turn)
        return turn

    def stats(self) -> str:
        if not self.turns:
            return "no answers yet"
        rounds = [a for t in self.turns for a in t.response.acceptance_lengths]
        tokens = sum(t.response.generation_tokens for t in self.turns)
        mean = sum(rounds) / len(rounds) if rounds else 0.0
        return (
            f"last answer: {turn_line(self.turns[-1])}\n"
            f"session: {len(self.turns)} answers, {tokens} tokens, mean acceptance {mean:.2f}, "
            f"{len(self.cache.tokens)} tokens in the cache"
        )


def turn_line(turn: Turn) -> str:
    r = turn.response
    prefilled = r.prompt_tokens - turn.reused_tokens
    line = stats_line(r)[:-1] + f", prefilled {prefilled} of {r.prompt_tokens} prompt tokens]"
    return line + (" [interrupted]" if turn.interrupted else "")


@contextmanager
def sigint_sets(event: threading.Event):
    """While inside, Ctrl-C sets ``event`` instead of raising KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_blockpilot.chat", description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--verbose", action="store_true",
                        help="banner and per-answer stats even when stdin is not a terminal")
    args = parser.parse_args(argv)
    interactive = sys.stdin.isatty()
    chatty = interactive or args.verbose

    def info(msg: str) -> None:
        if chatty:
            print(msg, file=sys.stderr, flush=True)

    try:
        SamplingParams(args.temp, args.top_p, args.top_k, args.seed)  # bad values fail before loading
        if args.max_tokens < 1:
            raise BlockPilotError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.block_size is not None and args.block_size != "auto" and args.block_size < 1:
            raise BlockPilotError(f"block size must be an integer >= 1 or 'auto', got {args.block_size}")
        chat = Chat(load_from_args(args), args.system, sampling_kwargs(args))
        if chat.options.get("block_size") == "auto" and chat.bundle.policy is None:
            raise BlockPilotError("block size 'auto' needs a policy; pass --block-size N or a bundle with a policy")
    except BlockPilotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    info("mlx_blockpilot chat: /help for commands, /quit or Ctrl-D to leave")

    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                chat.reset()
                info("(conversation reset)")
            elif cmd == "/stats":
                print(chat.stats(), flush=True)
            elif cmd == "/help":
                print(HELP, flush=True)
            else:
                print(f"unknown command {cmd}; /help lists the commands", file=sys.stderr, flush=True)
            continue
        stop = threading.Event()
        try:
            with sigint_sets(stop):
                turn = chat.reply(text, lambda s: print(s, end="", flush=True), stop)
        except BlockPilotError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        info(turn_line(turn))


if __name__ == "__main__":
    sys.exit(main())
