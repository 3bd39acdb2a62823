"""Convert a z-lab DFlash drafter directory into a bundle's ``draft/`` directory.

The drafter is loaded with ``mlx_blockpilot.draft.load_draft`` (which checks every
tensor against the config), optionally cast to a dtype and quantized with
``mlx.nn.quantize`` (its Linear layers, as mlx-lm quantizes a model), then saved
as ``config.json`` (the source config plus a ``quantization`` entry) and one
``model.safetensors``.
"""

from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_blockpilot.draft import load_draft, read_draft_config, save_draft
from mlx_blockpilot.dtypes import check_dtype, check_quantization
from mlx_blockpilot.errors import BlockPilotError

PathLike = Union[str, Path]


def convert_draft(
    src: PathLike,
    out_dir: PathLike,
    *,
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """Write the drafter in ``src`` into ``out_dir`` (created); returns facts for the manifest.

    Linear layers whose input size is not a multiple of ``q_group_size`` stay in
    full precision (``load_draft`` quantizes exactly the layers that have scales).
    """
    src, out_dir = Path(src), Path(out_dir)
    dtype = check_dtype(dtype)
    cfg, raw = read_draft_config(src)
    if q_bits is not None:
        check_quantization(q_bits, q_group_size, "drafter")
        if raw.get("quantization"):
            raise BlockPilotError(
                f"drafter {src} is already quantized; give its full-precision checkpoint or --draft-q-bits none"
            )
    model = load_draft(src)
    if dtype is not None:
        model.set_dtype(dtype)
    raw = dict(raw)
    if q_bits is not None:
        nn.quantize(
            model,
            group_size=q_group_size,
            bits=q_bits,
            class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % q_group_size == 0,
        )
        raw["quantization"] = {"group_size": q_group_size, "bits": q_bits}
    save_draft(model, out_dir, raw)
    weights = dict(tree_flatten(model.parameters()))
    floats = [v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating) and k.endswith("norm.weight")]
    quant = raw.get("quantization")
    return {
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_hidden_layers,
        "num_target_layers": cfg.num_target_layers,
        "target_layer_ids": list(cfg.target_layer_ids),
        "mask_token_id": cfg.mask_token_id,
        "block_size": cfg.block_size,
        "dtype": str(floats[0]).split(".")[-1] if floats else None,
        "quantization": {"bits": quant["bits"], "group_size": quant["group_size"]} if quant else None,
    }
