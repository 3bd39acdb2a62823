"""Data types and quantization settings that converters and tools accept (one definition each)."""

from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .errors import BlockPilotError

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def check_dtype(name: Optional[str]) -> Optional[mx.Dtype]:
    """The MLX dtype called ``name`` (``None`` stays ``None``: keep the source's)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise BlockPilotError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def dtype_name(dtype: mx.Dtype) -> str:
    """``DTYPES``' name of ``dtype`` (as configs write it, e.g. ``torch_dtype``)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def check_quantization(bits: Any, group_size: Any, what: str, input_size: Optional[int] = None) -> None:
    """Raise unless ``bits``/``group_size`` is a quantization we write (and, given
    ``input_size``, the group size divides it)."""
    if not is_int(bits) or bits not in QUANT_BITS:
        raise BlockPilotError(f"{what} quantization bits must be one of {QUANT_BITS}, got {bits!r}")
    if not is_int(group_size) or group_size not in QUANT_GROUP_SIZES:
        raise BlockPilotError(f"{what} quantization group size must be one of {QUANT_GROUP_SIZES}, got {group_size!r}")
    if input_size is not None and input_size % group_size:
        raise BlockPilotError(
            f"{what} input size {input_size} is not a multiple of the quantization group size {group_size}; "
            "pick a group size that divides it or do not quantize"
        )
