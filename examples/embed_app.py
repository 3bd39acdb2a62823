"""Embedding mlx_blockpilot in an application: a streaming callback and a Stop button.

The assistant keeps its KV caches between questions (only the new turn is prefilled).
Another thread (here a timer standing in for a UI's Stop button) cancels an answer by
setting a ``threading.Event``, which is checked between two streamed responses, so the
cache stays consistent and the next question still reuses it.

    python examples/embed_app.py --model BUNDLE
    python examples/embed_app.py --target DIR --draft DIR --stop-after 0.5
"""

import argparse
import sys
import threading
import time
from typing import Callable, Optional

from mlx_blockpilot import BlockPilotError, chat_prompt, load, make_cache, stream_generate


class Assistant:
    """A multi-turn assistant around a loaded bundle."""

    def __init__(self, bundle, system: Optional[str] = None, **options):
        self.bundle, self.options = bundle, options
        self.cache = make_cache(bundle.model, bundle.draft)
        self.messages = [{"role": "system", "content": system}] if system else []

    def ask(self, question: str, on_text: Callable[[str], None], cancel: threading.Event):
        """Stream the answer to ``on_text``; returns the last ``GenerationResponse``."""
        messages = self.messages + [{"role": "user", "content": question}]
        gen = stream_generate(self.bundle, chat_prompt(self.bundle, messages), prompt_cache=self.cache, **self.options)
        answer, last = [], None
        try:
            for last in gen:
                answer.append(last.text)
                on_text(last.text)
                if cancel.is_set():
                    break
        finally:
            gen.close()  # stopping at a yield leaves the cache holding exactly the committed tokens
        self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]
        return last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Embed mlx_blockpilot: streaming callback + cancellation")
    parser.add_argument("--model", help="a converted bundle directory")
    parser.add_argument("--target", help="an mlx-lm target directory")
    parser.add_argument("--draft", help="a DFlash drafter directory")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--stop-after", type=float, default=None,
                        help="press 'Stop' this many seconds into the second answer")
    parser.add_argument("questions", nargs="*", default=["Hello! Who are you?", "Tell me a long story.",
                                                          "Summarize what you said."])
    args = parser.parse_args(argv)
    try:
        bundle = load(args.model) if args.model else load(target=args.target, draft=args.draft)
    except BlockPilotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assistant = Assistant(bundle, system="You are a helpful assistant.", max_tokens=args.max_tokens, temperature=0.0)

    def show(piece: str) -> None:  # the app's UI callback
        sys.stdout.write(piece)
        sys.stdout.flush()

    for i, question in enumerate(args.questions):
        cancel = threading.Event()
        if args.stop_after is not None and i == 1:
            stop_button = threading.Timer(args.stop_after, cancel.set)  # e.g. the user clicks Stop
            stop_button.daemon = True
            stop_button.start()
        print(f"\n> {question}")
        tic = time.perf_counter()
        r = assistant.ask(question, show, cancel)
        status = "stopped" if cancel.is_set() and r.finish_reason is None else r.finish_reason
        print(f"\n[{status}: {r.generation_tokens} tokens in {time.perf_counter() - tic:.2f}s, "
              f"block size {r.block_size}, mean acceptance {r.mean_acceptance:.2f}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
