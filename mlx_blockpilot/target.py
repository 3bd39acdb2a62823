"""Run an mlx-lm target model and hand back logits plus the outputs of chosen layers.

The drafter conditions on the outputs of some target layers. Instead of patching
mlx-lm's classes, we run the decoder stack of the (unchanged) model instance here,
layer by layer, and keep the tapped outputs of the same forward pass.
"""

from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .errors import BlockPilotError

# Model types whose decoder stack is embed -> layers(h, mask, cache) -> norm -> head.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _inner(model: nn.Module) -> nn.Module:
    return model.model


def layers(model: nn.Module) -> List[nn.Module]:
    """The decoder layers, in order."""
    return list(_inner(model).layers)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the output head."""
    return _inner(model).norm


def check_supported(model: nn.Module) -> None:
    """Raise a clear error for targets whose forward pass we cannot tap."""
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", None
    )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BlockPilotError(
            f"target model type {model_type!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def num_layers(model: nn.Module) -> int:
    return len(_inner(model).layers)


def hidden_size(model: nn.Module) -> int:
    return model.args.hidden_size


def vocab_size(model: nn.Module) -> int:
    return model.args.vocab_size


def max_context(model: nn.Module) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """The target's token embedding (shared with the drafter)."""
    return _inner(model).embed_tokens(tokens)


def _head(model: nn.Module) -> nn.Module:
    """The module holding the output matrix: ``lm_head``, or the embedding when tied."""
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return _inner(model).embed_tokens
    return model.lm_head


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """The target's output head (shared with the drafter); handles tied embeddings."""
    head = _head(model)
    return head.as_linear(h) if isinstance(head, (nn.Embedding, nn.QuantizedEmbedding)) else head(h)


def head_rows(model: nn.Module, ids: mx.array) -> nn.Module:
    """The output head restricted to the vocabulary rows ``ids``: ``(.., H) -> (.., len(ids))``
    logits equal to ``lm_head(model, h)[..., ids]`` (quantized heads stay quantized)."""
    head = _head(model)
    H = hidden_size(model)
    if isinstance(head, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        sub = nn.QuantizedLinear(H, len(ids), bias=False, group_size=head.group_size, bits=head.bits,
                                 mode=getattr(head, "mode", "affine"))
        sub.weight, sub.scales = head.weight[ids], head.scales[ids]
        if getattr(head, "biases", None) is not None:
            sub.biases = head.biases[ids]
    else:
        sub = nn.Linear(H, len(ids), bias=False)
        sub.weight = head.weight[ids]
    if "bias" in head:
        sub.bias = head.bias[ids]
    mx.eval(sub.parameters())
    return sub


def head_weight(model: nn.Module) -> Optional[mx.array]:
    """The output matrix ``(V, H)`` (for training on a subset of its rows), or None when quantized."""
    head = _head(model)
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return None
    return head.weight


def make_cache(model: nn.Module) -> List[Any]:
    """The target's KV caches for speculative decoding: mlx-lm's, except that sliding-window
    layers get a plain ``KVCache``.

    mlx-lm's ``RotatingKVCache`` drops keys older than the window, so once it has wrapped,
    rejected draft tokens cannot be trimmed from it. A plain cache keeps them and
    ``forward`` applies the window with the attention mask instead: the same attention,
    and every round can be rewound. (It holds the whole context rather than a window.)
    """
    return [KVCache() if isinstance(c, RotatingKVCache) else c for c in make_prompt_cache(model)]


def forward(
    model: nn.Module,
    tokens: mx.array,
    cache: List[Any],
    tap_layer_ids: Sequence[int] = (),
) -> Tuple[mx.array, Optional[mx.array]]:
    """One target forward pass over ``tokens`` (shape ``(1, L)``) with ``cache``.

    Returns the logits ``(1, L, V)`` and the outputs of ``tap_layer_ids``
    concatenated on the feature axis ``(1, L, len(ids) * hidden)`` (``None`` when
    no layer is tapped). Numerically this is ``model(tokens, cache)``.
    """
    inner = _inner(model)
    h = inner.embed_tokens(tokens)
    window = getattr(inner, "sliding_window", None)
    masks = {}
    taps = {}
    wanted = set(tap_layer_ids)
    for i, (layer, c) in enumerate(zip(inner.layers, cache)):
        w = window if getattr(layer, "use_sliding", False) else None
        if w not in masks:
            masks[w] = create_attention_mask(h, c, window_size=w)
        h = layer(h, masks[w], c)
        if i in wanted:
            taps[i] = h
    logits = lm_head(model, inner.norm(h))
    hidden = mx.concatenate([taps[i] for i in tap_layer_ids], axis=-1) if taps else None
    return logits, hidden
