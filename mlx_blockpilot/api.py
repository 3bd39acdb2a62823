"""The public API over a bundle: ``generate``, ``stream_generate``, ``chat_prompt``.

    bundle = load("bundle_dir")
    prompt = chat_prompt(bundle, [{"role": "user", "content": "Hello!"}])
    for r in stream_generate(bundle, prompt, max_tokens=200):
        print(r.text, end="", flush=True)
"""

from typing import Callable, Dict, List, Optional, Sequence, Union

from . import decode
from .bundle import Bundle
from .costs import LearnedCosts, cache_path, calibrate
from .decode import GenerationResponse
from .options import GenerationOptions
from .prompts import encode_chat
from .schedule import session_acceptance

Prompt = Union[str, Sequence[int]]


def chat_prompt(bundle: Bundle, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` under the target's chat template, ready for the assistant turn."""
    return encode_chat(bundle.tokenizer, messages)


def costs_for(bundle: Bundle, refine: bool, progress: Optional[Callable[[str], None]] = None):
    """This machine's round costs when ``refine`` needs them (it picks widths by expected
    tokens per second), else None: measured once per machine and bundle, then cached, and
    corrected by the times of the bundle's rounds from then on (``costs.LearnedCosts``; the
    corrections are kept in the cached calibration for later sessions)."""
    if refine and bundle.costs is None:
        bundle.costs = LearnedCosts(calibrate(bundle, progress=progress), path=cache_path(bundle))
        bundle.acceptance = session_acceptance()
    return bundle.costs if refine else None


def _with_bundle(bundle: Bundle, options: dict) -> dict:
    options.setdefault("policy", bundle.policy)
    if options.get("costs") is None:
        fields = {k: v for k, v in options.items() if k in GenerationOptions.__dataclass_fields__}
        resolved = GenerationOptions.from_kwargs(**fields).resolve(bundle.draft.config.block_size, options["policy"])
        options["costs"] = costs_for(bundle, resolved.refine)
        if options["costs"] is not None:
            options.setdefault("acceptance", bundle.acceptance)
    return options


def stream_generate(bundle: Bundle, prompt: Prompt, **options):
    """Yield a ``GenerationResponse`` per round; ``options`` are ``GenerationOptions`` fields,
    ``prompt_cache`` (``make_cache(bundle.model, bundle.draft)``) and ``policy``. ``block_size``
    defaults to ``"auto"`` (the policy) when the bundle has one, otherwise to the drafter's
    training block size. With ``refine`` (the default with ``"auto"``) each round's width
    maximises expected tokens per second from this machine's calibrated costs (measured at
    first use, a few seconds, then cached beside the bundle), corrected by how long the
    bundle's rounds take, and from how often its drafts were accepted so far."""
    return decode.stream_generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_bundle(bundle, options))


def generate(bundle: Bundle, prompt: Prompt, **options) -> GenerationResponse:
    """Generate to the end; the returned response holds all text and tokens."""
    return decode.generate(bundle.model, bundle.draft, bundle.tokenizer, prompt, **_with_bundle(bundle, options))
