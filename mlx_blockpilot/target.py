"""Run an mlx-lm target model and hand back logits plus the outputs of chosen layers.

The drafter conditions on the outputs of some target layers. Instead of patching
mlx-lm's classes, we run the decoder stack of the (unchanged) model instance here,
layer by layer, and keep the tapped outputs of the same forward pass.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .errors import BlockPilotError

FULL, SLIDING, LINEAR = "full", "sliding", "linear"


@dataclass(frozen=True)
class Family:
    """How one family of mlx-lm models lays out its decoder stack (read off the model itself).

    ``text`` finds the text model (the module with ``args``, ``model`` and ``lm_head``) in
    what ``mlx_lm.load`` returns; ``kinds`` names each layer's attention: ``full``,
    ``sliding`` (a window of ``window`` keys) or ``linear`` (a recurrent state that cannot
    be trimmed; ``replay`` re-runs such a layer on the inputs a rewind keeps).
    ``embed_scale`` multiplies the embeddings as the family's forward does;
    ``logit_cap`` soft-caps the target's logits; ``layers`` runs the decoder stack when it
    is not plain ``layer(h, mask, cache)`` calls (yields the output of every layer).
    """

    kinds: Callable[[nn.Module], List[str]]
    window: Callable[[nn.Module], Optional[int]] = lambda inner: None
    text: Callable[[nn.Module], nn.Module] = lambda model: model
    embed_scale: Optional[Callable[[nn.Module], mx.array]] = None
    replay: Optional[Callable[[nn.Module, mx.array, Any], None]] = None
    logit_cap: Callable[[nn.Module], Optional[float]] = lambda model: None
    layers: Optional[Callable[..., Iterator[mx.array]]] = None


def _flagged(attr: str, kind: str):
    """Layers whose ``attr`` is true are ``kind``, the others ``full``."""
    return lambda inner: [kind if getattr(layer, attr, False) else FULL for layer in inner.layers]


def _gated_delta_replay(layer, x, cache) -> None:
    layer.linear_attn(layer.input_layernorm(x), None, cache)


def _gemma4_layers(inner, tokens, h, caches, masks) -> Iterator[mx.array]:
    """Gemma 4's stack: per-layer input embeddings, and KV-shared layers that reuse the keys
    and values of an earlier layer of their kind (they have no cache of their own)."""
    per_layer = None
    if inner.hidden_size_per_layer_input:
        shape = (len(inner.layers), inner.hidden_size_per_layer_input)
        looked_up = mx.unflatten(inner.embed_tokens_per_layer(tokens) * inner.embed_tokens_per_layer_scale, -1, shape)
        projected = mx.unflatten(inner.per_layer_model_projection(h) * inner.per_layer_projection_scale, -1, shape)
        per_layer = (inner.per_layer_projection_norm(projected) + looked_up) * inner.per_layer_input_scale
    shared = [(None, None)] * len(inner.layers)
    for i, (layer, c, mask, source) in enumerate(zip(inner.layers, caches, masks, inner.previous_kvs)):
        kvs, offset = shared[source]
        h, kvs, offset = layer(h, mask, c, per_layer_input=None if per_layer is None else per_layer[:, :, i, :],
                               shared_kv=kvs, offset=offset)
        shared[i] = (kvs, offset)
        yield h


_DENSE = Family(kinds=_flagged("use_sliding", SLIDING), window=lambda inner: getattr(inner, "sliding_window", None))
_HYBRID = dict(kinds=_flagged("is_linear", LINEAR), replay=_gated_delta_replay)
# The one list of supported target families, by mlx-lm model type.
FAMILIES: Dict[str, Family] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "qwen3_moe": _DENSE,
    "qwen3_next": Family(**_HYBRID),
    "qwen3_5": Family(text=lambda model: model.language_model, **_HYBRID),
    "qwen3_5_moe": Family(text=lambda model: model.language_model, **_HYBRID),
    "gpt_oss": Family(
        kinds=lambda inner: [SLIDING if t == "sliding_attention" else FULL for t in inner.layer_types],
        window=lambda inner: inner.window_size,
    ),
    "gemma3_text": Family(
        kinds=lambda inner: [FULL if i % inner.sliding_window_pattern == inner.sliding_window_pattern - 1 else SLIDING
                             for i in range(len(inner.layers))],
        window=lambda inner: inner.window_size,
        embed_scale=lambda inner: mx.array(inner.args.hidden_size**0.5, mx.bfloat16),
    ),
    "gemma4_text": Family(
        kinds=lambda inner: [SLIDING if layer.layer_type == "sliding_attention" else FULL for layer in inner.layers],
        window=lambda inner: inner.window_size,
        embed_scale=lambda inner: mx.array(inner.embed_scale),
        logit_cap=lambda model: model.final_logit_softcapping,
        layers=_gemma4_layers,
    ),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def model_type(model: nn.Module) -> Optional[str]:
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)


def family(model: nn.Module) -> Family:
    """The model's family; a clear error naming the supported ones when it has none."""
    kind = model_type(model)
    if kind not in FAMILIES:
        raise BlockPilotError(
            f"target model type {kind!r} is not supported; use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[kind]


def _text(model: nn.Module) -> nn.Module:
    return family(model).text(model)


def _inner(model: nn.Module) -> nn.Module:
    return _text(model).model


def half_split_rows(w: mx.array, head_dim: int) -> mx.array:
    """Q/K projection rows from interleaved-pair RoPE order (GGUF's; mlx ``traditional=True``)
    to the half-split order of Hugging Face checkpoints and the drafter."""
    rows, cols = w.shape
    w = w.reshape(rows // head_dim, head_dim // 2, 2, cols)
    return mx.concatenate([w[:, :, 0], w[:, :, 1]], axis=1).reshape(rows, cols)


def text_args(model: nn.Module):
    """The text model's mlx-lm ``ModelArgs`` (sizes, norms, RoPE)."""
    return _text(model).args


def layers(model: nn.Module) -> List[nn.Module]:
    """The decoder layers, in order."""
    return list(_inner(model).layers)


def layer_kinds(model: nn.Module) -> List[str]:
    """Each decoder layer's attention: ``full``, ``sliding`` or ``linear``."""
    return family(model).kinds(_inner(model))


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the output head."""
    return _inner(model).norm


def check_supported(model: nn.Module) -> None:
    """Raise a clear error for targets whose forward pass we cannot tap."""
    family(model)


def num_layers(model: nn.Module) -> int:
    return len(_inner(model).layers)


def hidden_size(model: nn.Module) -> int:
    return text_args(model).hidden_size


def vocab_size(model: nn.Module) -> int:
    return text_args(model).vocab_size


def max_context(model: nn.Module) -> Optional[int]:
    return getattr(text_args(model), "max_position_embeddings", None)


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """The target's token embedding (shared with the drafter)."""
    return _inner(model).embed_tokens(tokens)


def _head(model: nn.Module) -> nn.Module:
    """The module holding the output matrix: ``lm_head``, or the embedding when tied."""
    text = _text(model)
    if getattr(text.args, "tie_word_embeddings", False) or "lm_head" not in text:
        return _inner(model).embed_tokens
    return text.lm_head


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
    replay: Optional[List[Any]] = None,
) -> Tuple[mx.array, Optional[mx.array]]:
    """One target forward pass over ``tokens`` (shape ``(B, L)``) with ``cache``.

    Returns the logits ``(B, L, V)`` and the outputs of ``tap_layer_ids``
    concatenated on the feature axis ``(B, L, len(ids) * hidden)`` (``None`` when
    no layer is tapped). Numerically this is ``model(tokens, cache)``. Given a list,
    ``replay`` receives what ``rewind_linear`` needs to take this pass back on layers
    whose state cannot be trimmed.
    """
    fam = family(model)
    inner = _inner(model)
    h = inner.embed_tokens(tokens)
    if fam.embed_scale is not None:
        h = h * fam.embed_scale(inner).astype(h.dtype)
    kinds = fam.kinds(inner)
    window = fam.window(inner)
    caches = list(cache) + [None] * (len(kinds) - len(cache))  # KV-shared layers have no cache
    by_kind = {}
    for kind, c in zip(kinds, caches):  # each kind's mask from its first layer's cache
        if kind not in by_kind:
            by_kind[kind] = (create_ssm_mask(h, c) if kind == LINEAR
                             else create_attention_mask(h, c, window_size=window if kind == SLIDING else None))
    masks = [by_kind[kind] for kind in kinds]
    taps = {}
    wanted = set(tap_layer_ids)
    if fam.layers is not None:
        outputs = fam.layers(inner, tokens, h, caches, masks)
    else:
        outputs = _plain_layers(inner, h, caches, masks, kinds, replay)
    for i, h in enumerate(outputs):
        if i in wanted:
            taps[i] = h
    logits = lm_head(model, inner.norm(h))
    cap = fam.logit_cap(_text(model))
    if cap:
        logits = mx.tanh(logits / cap) * cap
    hidden = mx.concatenate([taps[i] for i in tap_layer_ids], axis=-1) if taps else None
    return logits, hidden


def logits_from_layer(model: nn.Module, h: mx.array, layer_id: int, head: Optional[nn.Module] = None) -> mx.array:
    """The logits of a whole sequence from the output ``h`` ``(B, L, hidden)`` of its layer
    ``layer_id`` (a tapped feature): the layers after it over ``h`` with no cache, then the
    final norm and the head (``head``: e.g. ``head_rows`` of some vocabulary rows; default the
    target's, soft-capped as ``forward`` does). For distillation: the target's distributions
    of stored sequences for a few layers' cost instead of a whole forward pass."""
    fam = family(model)
    inner = _inner(model)
    if fam.layers is not None:
        raise BlockPilotError(f"{model_type(model)} targets run their layers as a whole; "
                              "their logits cannot be computed from one layer's output")
    kinds = fam.kinds(inner)[layer_id + 1 :]
    window = fam.window(inner)
    masks = [create_ssm_mask(h, None) if kind == LINEAR
             else create_attention_mask(h, None, window_size=window if kind == SLIDING else None) for kind in kinds]
    rest = inner.layers[layer_id + 1 :]
    for h in _plain_layers(inner, h, [None] * len(rest), masks, kinds, None, rest):
        pass
    h = inner.norm(h)
    if head is not None:
        return head(h)
    logits = lm_head(model, h)
    cap = fam.logit_cap(_text(model))
    return mx.tanh(logits / cap) * cap if cap else logits


def _plain_layers(inner, h, caches, masks, kinds, replay, layers=None) -> Iterator[mx.array]:
    """``layer(h, mask, cache)`` for every layer, recording what linear-attention layers need
    to be taken back (``rewind_linear``); ``layers``: a run of them (default all)."""
    for layer, c, mask, kind in zip(inner.layers if layers is None else layers, caches, masks, kinds):
        if kind == LINEAR and replay is not None:
            replay.append((layer, c, list(c.cache), h))
        h = layer(h, mask, c)
        yield h


def rewind_linear(model: nn.Module, replay: List[Any], kept: int) -> None:
    """Take back a pass on the layers whose recurrent state cannot be trimmed: each goes back
    to its state before the pass (``replay`` from ``forward``) and runs again over the first
    ``kept`` positions of its input, so its state is exactly that after the kept tokens.

    Only the state is kept (lazily: the layer's output is never evaluated), so this costs
    the state's own computation for ``kept`` positions of these layers, no other layer.
    """
    run = family(model).replay
    for layer, cache, before, x in replay:
        cache.cache = list(before)
        if kept:
            run(layer, x[:, :kept], cache)
