"""``python -m mlx_blockpilot.chat``: multi-turn chat in the terminal.

The KV caches stay alive across turns (``conversation.Chat``): each turn only the new
tokens are prefilled. Ctrl-C stops the current answer (between two decoding rounds,
so the cache stays consistent) and keeps the part already shown.
"""

import signal
import sys
import threading
from contextlib import contextmanager

from ..conversation import Chat, Turn
from ..errors import BlockPilotError
from ..prompts import check_text
from .common import add_model_args, add_sampling_args, calibrate_if_needed, check_auto, fail, load_from_args, option_kwargs, options_from_args, parser
from .generate import stats_line

HELP = """commands:
  /reset   forget the conversation (keeps the system prompt)
  /stats   statistics of the last answer and of the session
  /help    this help
  /quit    leave (or Ctrl-D)
Ctrl-C stops the current answer."""


def build_parser():
    p = parser("chat", __doc__.splitlines()[0].split(": ", 1)[1])
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--verbose", action="store_true", help="banner and per-answer stats even when stdin is not a terminal")
    return p


def turn_line(turn: Turn) -> str:
    r = turn.response
    prefilled = r.prompt_tokens - turn.reused_tokens
    line = stats_line(r)[:-1] + f", prefilled {prefilled} of {r.prompt_tokens} prompt tokens]"
    return line + (" [interrupted]" if turn.interrupted else "")


def session_stats(chat: Chat) -> str:
    if not chat.turns:
        return "no answers yet"
    rounds = [a for t in chat.turns for a in t.response.acceptance_lengths]
    tokens = sum(t.response.generation_tokens for t in chat.turns)
    mean = sum(rounds) / len(rounds) if rounds else 0.0
    return (
        f"last answer: {turn_line(chat.turns[-1])}\n"
        f"session: {len(chat.turns)} answers, {tokens} tokens, mean acceptance {mean:.2f}, "
        f"{len(chat.cache.tokens)} tokens in the cache"
    )


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
    try:
        args = build_parser().parse_args(argv)
    except BlockPilotError as e:
        return fail(e)
    interactive = sys.stdin.isatty()
    chatty = interactive or args.verbose

    def info(msg: str) -> None:
        if chatty:
            print(msg, file=sys.stderr, flush=True)

    try:
        options = options_from_args(args)  # bad values fail before loading
        bundle = load_from_args(args)
        check_auto(options, bundle)
        calibrate_if_needed(bundle, options)
        chat = Chat(bundle, args.system, option_kwargs(options))
    except BlockPilotError as e:
        return fail(e)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if hasattr(sys.stdin, "reconfigure"):  # stray bytes become one error line per message, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    info("mlx_blockpilot chat: /help for commands, /quit or Ctrl-D to leave")

    while True:
        try:
            line = check_text(input(">>> " if interactive else ""), "the message")
        except BlockPilotError as e:
            fail(e)
            continue
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
                print(session_stats(chat), flush=True)
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
            fail(e)
            continue
        print(flush=True)
        info(turn_line(turn))
