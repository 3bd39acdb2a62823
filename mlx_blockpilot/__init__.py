"""mlx_blockpilot: lossless DFlash speculative decoding in MLX with a per-prompt block size.

    from mlx_blockpilot import load, generate, stream_generate

    bundle = load("path/to/bundle")            # or load(target=..., draft=...)
    for r in stream_generate(bundle, "Hello!", max_tokens=100):
        print(r.text, end="", flush=True)
"""

from .api import chat_prompt, generate, stream_generate
from .bundle import Bundle, load
from .cache import PromptCache, make_cache
from .decode import GenerationResponse
from .errors import BlockPilotError
from .options import GenerationOptions

__version__ = "0.1.0"

__all__ = [
    "BlockPilotError",
    "Bundle",
    "GenerationOptions",
    "GenerationResponse",
    "PromptCache",
    "chat_prompt",
    "generate",
    "load",
    "make_cache",
    "stream_generate",
]
