"""mlx_blockpilot: lossless DFlash speculative decoding in MLX with a per-prompt block size.

    from mlx_blockpilot import load, generate, stream_generate

    bundle = load("path/to/bundle")            # or load(target=..., draft=...)
    for r in stream_generate(bundle, "Hello!", max_tokens=100):
        print(r.text, end="", flush=True)
"""

from typing import Any, Dict, List, Sequence, Union

from .bundle import Bundle, load
from . import decode as _decode
from .decode import GenerationResponse, PromptCache, make_cache
from .errors import BlockPilotError

__version__ = "0.1.0"

Prompt = Union[str, Sequence[int]]


def chat_prompt(bundle: Bundle, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` under the target's chat template, ready for the assistant turn."""
    tok = bundle.tokenizer
    if not getattr(tok, "has_chat_template", False):
        raise BlockPilotError("the target's tokenizer has no chat template; pass a plain prompt instead")
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


def _with_defaults(bundle: Bundle, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    kwargs.setdefault("block_size", bundle.default_block_size)
    kwargs.setdefault("policy", bundle.policy)
    return kwargs


def stream_generate(bundle: Bundle, prompt: Prompt, **kwargs):
    """Yield a ``GenerationResponse`` per round (options: ``decode.stream_generate``).

    ``block_size`` defaults to ``"auto"`` (the policy) when the bundle has one,
    otherwise to the drafter's training block size.
    """
    return _decode.stream_generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_defaults(bundle, kwargs))


def generate(bundle: Bundle, prompt: Prompt, **kwargs) -> GenerationResponse:
    """Generate to the end; the returned response holds all text and tokens."""
    return _decode.generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_defaults(bundle, kwargs))


__all__ = [
    "BlockPilotError",
    "Bundle",
    "GenerationResponse",
    "PromptCache",
    "chat_prompt",
    "generate",
    "load",
    "make_cache",
    "stream_generate",
]
