"""A multi-turn conversation with a bundle, its prompt cache kept across turns.

Each turn the whole templated conversation is passed to the decoder, which reuses the
longest prefix already in the cache and prefills only the rest. A ``stop`` event ends
an answer between two decoding rounds, so the cache stays consistent and the part
already produced stays in the conversation.
"""

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .api import chat_prompt, stream_generate
from .cache import make_cache
from .decode import GenerationResponse
from .errors import BlockPilotError
from .options import check_prompt_length
from .target import max_context


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
        try:
            check_prompt_length(len(ids), max_context(self.bundle.model))
        except BlockPilotError as e:
            raise BlockPilotError(f"{e} (/reset starts the conversation over)") from None
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
        turn = Turn(r, r.reused_tokens, interrupted)
        self.turns.append(turn)
        return turn
