"""Every check and default of one generation, in one place.

``GenerationOptions`` is what a caller asks for (the API's keyword arguments, a CLI's
flags, a server request's fields). Building one validates it; ``OptionError`` names
the offending option so a CLI or the server can put the error in its own words.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

from .dtypes import is_int
from .errors import BlockPilotError

BlockSize = Union[int, str]
AUTO = "auto"
# Prompt tokens per target pass during prefill (as mlx-lm's prefill_step_size).
PREFILL_STEP_SIZE = 2048
DEFAULT_MAX_TOKENS = 256
# Temperatures below this decode greedily: dividing logits by them overflows float32
# (1e-46 is 0 in float32), and sampling that cold is greedy decoding anyway.
GREEDY_BELOW = 1e-5
SEED_RANGE = 2**64  # mx.random.key takes 0 <= seed < 2**64


class OptionError(BlockPilotError):
    """A bad generation option; ``option`` is its keyword name (``temperature``, ``block_size``, ...)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def check_block_size(value: Any) -> BlockSize:
    """``value`` if it is an integer >= 1 or ``"auto"``; raise otherwise."""
    if value == AUTO or (is_int(value) and value >= 1):
        return value
    raise OptionError("block_size", f"block size must be an integer >= 1 or 'auto', got {value!r}")


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. ``block_size=None`` means the bundle's default (``"auto"`` with a
    policy, else the drafter's training block size); ``refine=None`` means on with
    ``"auto"`` (each round's width from measured costs, see ``schedule.CostAware``) and off
    with a fixed size; see ``resolve``."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    block_size: Optional[BlockSize] = None
    refine: Optional[bool] = None
    prefill_step_size: int = PREFILL_STEP_SIZE

    def __post_init__(self):
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise OptionError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise OptionError("temperature", f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"top-p must be in (0, 1], got {self.top_p}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise OptionError("top_k", f"top-k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < SEED_RANGE):
            raise OptionError("seed", f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.block_size is not None:
            check_block_size(self.block_size)
        if not is_int(self.prefill_step_size) or self.prefill_step_size < 1:
            raise OptionError("prefill_step_size", f"prefill_step_size must be >= 1, got {self.prefill_step_size!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        """Options from keyword arguments, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionError(unknown[0], f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        """Decode greedily: temperature 0, or below ``GREEDY_BELOW``."""
        return self.temperature < GREEDY_BELOW

    def resolve(self, draft_block_size: int, policy) -> "GenerationOptions":
        """These options with ``block_size`` and ``refine`` decided: the default block size
        is ``"auto"`` when there is a policy, else ``draft_block_size`` (``"auto"`` without a
        policy is an error); ``refine`` defaults to on with ``"auto"``, off otherwise."""
        block_size = self.block_size
        if block_size is None:
            block_size = AUTO if policy is not None else draft_block_size
        if block_size == AUTO and policy is None:
            raise OptionError("block_size", "block size 'auto' needs a policy; pass --block-size N or a bundle with a policy")
        refine = self.refine if self.refine is not None else block_size == AUTO
        return replace(self, block_size=block_size, refine=bool(refine))


def check_prompt_length(prompt_tokens: int, context: Optional[int]) -> None:
    """Raise unless a prompt of ``prompt_tokens`` leaves room to generate in ``context``."""
    if prompt_tokens < 1:
        raise OptionError("prompt", "the prompt is empty; give at least one token of text")
    if context is not None and prompt_tokens >= context:
        raise OptionError(
            "prompt", f"the prompt has {prompt_tokens} tokens but the target's context is {context}; shorten it"
        )
