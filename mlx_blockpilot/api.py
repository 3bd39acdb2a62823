"""The public API over a bundle: ``generate``, ``stream_generate``, ``chat_prompt``.

    bundle = load("bundle_dir")
    prompt = chat_prompt(bundle, [{"role": "user", "content": "Hello!"}])
    for r in stream_generate(bundle, prompt, max_tokens=200):
        print(r.text, end="", flush=True)
"""

from typing import Dict, List, Sequence, Union

from . import decode
from .bundle import Bundle
from .costs import calibrate
from .decode import GenerationResponse
from .prompts import encode_chat

Prompt = Union[str, Sequence[int]]


def chat_prompt(bundle: Bundle, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` under the target's chat template, ready for the assistant turn."""
    return encode_chat(bundle.tokenizer, messages)


def _with_bundle(bundle: Bundle, options: dict) -> dict:
    options.setdefault("policy", bundle.policy)
    if options.get("refine") and options.get("costs") is None:
        if bundle.costs is None:  # measured once per machine and bundle, then read from its cache
            bundle.costs = calibrate(bundle)
        options["costs"] = bundle.costs
    return options


def stream_generate(bundle: Bundle, prompt: Prompt, **options):
    """Yield a ``GenerationResponse`` per round; ``options`` are ``GenerationOptions`` fields,
    ``prompt_cache`` (``make_cache(bundle.model, bundle.draft)``) and ``policy``. ``block_size``
    defaults to ``"auto"`` (the policy) when the bundle has one, otherwise to the drafter's
    training block size. With ``refine=True`` each round's width maximises expected tokens per
    second from this machine's calibrated costs (measured at first use, a few seconds)."""
    return decode.stream_generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_bundle(bundle, options))


def generate(bundle: Bundle, prompt: Prompt, **options) -> GenerationResponse:
    """Generate to the end; the returned response holds all text and tokens."""
    return decode.generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_bundle(bundle, options))
