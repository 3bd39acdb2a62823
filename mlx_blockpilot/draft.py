"""The DFlash block-diffusion drafter (z-lab checkpoint layout) and its context cache.

One call drafts a whole block: the block's tokens ``[last committed, MASK, ...]``
attend to each other and to the drafter's projection of target hidden states of
the committed context. Context keys/values are cached across rounds; block
keys/values never enter the cache, so the cache always holds exactly the
committed context that the drafter has seen.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3 import MLP
from mlx_lm.models.rope_utils import initialize_rope

from . import target
from .dtypes import is_int
from .errors import BlockPilotError


# DFlash 2 drafter fields (a convolution and a candidate selector) that this drafter lacks.
DFLASH2_FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")


@dataclass
class DraftConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: Tuple[int, ...]
    mask_token_id: int
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 40960
    block_size: int = 16
    layer_types: Tuple[str, ...] = ()
    sliding_window: Optional[int] = None
    is_causal: Optional[bool] = None
    # A reduced draft vocabulary: the head covers draft_vocab_size target tokens, those of
    # the weight ``d2t`` (draft id i is target id i + d2t[i]), as EAGLE-3 checkpoints store it.
    draft_vocab_size: Optional[int] = None
    # Block embeddings are multiplied by input_embedding_scale; logits by output_multiplier,
    # then soft-capped: cap * tanh(logits / cap) (Gemma-style targets' drafters).
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: Optional[float] = None

    def __post_init__(self):
        def fail(name, want):
            raise BlockPilotError(f"draft config {name} must be {want}, got {getattr(self, name)!r}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "vocab_size", "num_target_layers", "block_size", "max_position_embeddings"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        if not is_int(self.mask_token_id):
            fail("mask_token_id", "an integer")
        if not isinstance(self.target_layer_ids, (list, tuple)) or not all(is_int(i) for i in self.target_layer_ids):
            fail("target_layer_ids", "a list of integers")
        for name in ("rms_norm_eps", "rope_theta", "input_embedding_scale", "output_multiplier"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                fail(name, "a number")
        cap = self.final_logit_softcapping
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0):
            fail("final_logit_softcapping", "a number >= 0 or null")
        if self.sliding_window is not None and (not is_int(self.sliding_window) or self.sliding_window < 1):
            fail("sliding_window", "a positive integer or null")
        if self.is_causal is not None and not isinstance(self.is_causal, bool):
            fail("is_causal", "true, false or null")
        if not isinstance(self.layer_types, (list, tuple)) or not all(isinstance(t, str) for t in self.layer_types):
            fail("layer_types", "a list of strings")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            fail("rope_scaling", "an object or null")
        self.target_layer_ids = tuple(int(i) for i in self.target_layer_ids)
        if not self.layer_types:
            self.layer_types = ("full_attention",) * self.num_hidden_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise BlockPilotError(
                f"draft config has {len(self.layer_types)} layer_types for "
                f"{self.num_hidden_layers} layers; make them the same length"
            )
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise BlockPilotError(f"draft config has unsupported layer_types {sorted(unknown)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise BlockPilotError("draft config has sliding_attention layers but no sliding_window")
        if not self.target_layer_ids:
            raise BlockPilotError("draft config has an empty target_layer_ids list")
        if self.draft_vocab_size is not None and not (
            is_int(self.draft_vocab_size) and 1 <= self.draft_vocab_size <= self.vocab_size
        ):
            raise BlockPilotError(
                f"draft config draft_vocab_size must be an integer in [1, vocab_size={self.vocab_size}], "
                f"got {self.draft_vocab_size!r}"
            )

    @classmethod
    def from_dict(cls, cfg: Dict[str, Any]) -> "DraftConfig":
        """Read a z-lab ``config.json`` (``dflash_config`` keys win over top-level ones)."""
        if not isinstance(cfg, dict):
            raise BlockPilotError(f"draft config.json must be a JSON object, got {type(cfg).__name__}")
        dflash = cfg.get("dflash_config")
        dflash = {} if dflash is None else dflash
        if not isinstance(dflash, dict):
            raise BlockPilotError(f"draft config dflash_config must be an object, got {type(dflash).__name__}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        if rope is not None and not isinstance(rope, dict):
            raise BlockPilotError(f"draft config rope_parameters/rope_scaling must be an object, got {rope!r}")
        merged = dict(cfg)
        merged["rope_theta"] = cfg.get("rope_theta") or (rope or {}).get("rope_theta", 1e6)
        merged["rope_scaling"] = rope
        unsupported = [k for k in DFLASH2_FIELDS if dflash.get(k, cfg.get(k))]
        if "DFlash2DraftModel" in (cfg.get("architectures") or []) or unsupported:
            raise BlockPilotError(
                f"this is a DFlash 2 drafter ({', '.join(unsupported) or 'DFlash2DraftModel'}); "
                "only DFlash (v1) drafters are supported"
            )
        merged["block_size"] = dflash.get("block_size", cfg.get("block_size", 16))
        for key in ("target_layer_ids", "mask_token_id", "final_logit_softcapping", "input_embedding_scale",
                    "output_multiplier"):
            if key in dflash:
                merged[key] = dflash[key]
        for key in ("input_embedding_scale", "output_multiplier"):
            if merged.get(key) is None:
                merged.pop(key, None)
        if "target_layer_ids" not in merged and "aux_hidden_state_layer_ids" in cfg:
            aux = cfg["aux_hidden_state_layer_ids"]
            if not isinstance(aux, list) or not all(is_int(i) for i in aux):
                raise BlockPilotError(f"draft config aux_hidden_state_layer_ids must be a list of integers, got {aux!r}")
            merged["target_layer_ids"] = [i - 1 for i in aux]
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in merged.items() if k in names})
        except TypeError as e:
            raise BlockPilotError(f"draft config.json is missing required keys ({e})") from None

    def to_dict(self) -> Dict[str, Any]:
        """A z-lab style ``config.json``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_layer_ids"] = list(self.target_layer_ids)
        out["layer_types"] = list(self.layer_types)
        if self.draft_vocab_size is None:
            del out["draft_vocab_size"]
        out["architectures"] = ["DFlashDraftModel"]
        out["model_type"] = "qwen3"
        out["dflash_config"] = {
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
        }
        for key in ("input_embedding_scale", "output_multiplier", "final_logit_softcapping"):
            value = out.pop(key)
            if value not in (None, 1.0):
                out["dflash_config"][key] = value
        return out


def block_mask(anchors: np.ndarray, ctx_len: int, block_size: int, window: Optional[int], causal: bool) -> np.ndarray:
    """Which keys each block query sees: ``(S, 1, nb*B, ctx_len + nb*B)`` booleans.

    Row ``s`` holds ``nb`` blocks of ``block_size`` queries; block ``b`` starts at the
    absolute position ``anchors[s, b]``. Keys are ``ctx_len`` context positions
    ``0..ctx_len-1`` then the blocks' own positions. A block sees the context strictly
    before its anchor (for sliding layers only keys less than ``window`` before each
    query) and its own block (causally for causal layers), never another block.
    """
    S, nb = anchors.shape
    B = block_size
    j = np.arange(ctx_len)[None, None, :]
    a = np.repeat(anchors, B, axis=1)[:, :, None]  # (S, nb*B, 1)
    ctx = j < a
    if window is not None:
        q = a + np.tile(np.arange(B), nb)[None, :, None]
        ctx = ctx & (q - j < window)
    blk = np.kron(np.eye(nb, dtype=bool), np.tril(np.ones((B, B), bool)) if causal else np.ones((B, B), bool))
    blk = np.broadcast_to(blk, (S, nb * B, nb * B))
    return np.concatenate([ctx, blk], axis=-1)[:, None]


class DraftAttention(nn.Module):
    """Qwen3-style attention whose queries are block rows and whose keys are [context, blocks]."""

    def __init__(self, cfg: DraftConfig, layer_type: str):
        super().__init__()
        dim, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = hd**-0.5
        self.window = cfg.sliding_window if layer_type == "sliding_attention" else None
        # Published checkpoints: sliding layers are causal inside the block unless told.
        self.causal = (self.window is not None) if cfg.is_causal is None else cfg.is_causal
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)

    def _heads(self, x, n, norm=None):
        B, L, _ = x.shape
        x = x.reshape(B, L, n, -1)
        return (norm(x) if norm is not None else x).transpose(0, 2, 1, 3)

    @staticmethod
    def _rope_blocks(t, rope, starts):
        """RoPE for block rows ``(S, n, nb*B, hd)``: block ``b`` of row ``s`` at ``starts[s, b]``..."""
        if isinstance(starts, int):
            return rope(t, offset=starts)
        S, n, Q, hd = t.shape
        nb = starts.shape[1]
        t = t.reshape(S, n, nb, Q // nb, hd).transpose(0, 2, 1, 3, 4).reshape(S * nb, n, Q // nb, hd)
        t = rope(t, offset=starts.reshape(-1))
        return t.reshape(S, nb, n, Q // nb, hd).transpose(0, 2, 1, 3, 4).reshape(S, n, Q, hd)

    def __call__(self, x, ctx, rope, cache: Optional[KVCache] = None, anchors=None, mask=None):
        """Attend from the block rows ``x`` ``(S, Q, H)`` to the context ``ctx`` ``(S, C, H)`` and the blocks.

        Decoding: one block right after the context; ``ctx`` is the new context,
        appended to ``cache`` at its offset, and the mask comes from ``block_mask``.
        Training: ``anchors`` ``(S, nb)`` place ``nb`` blocks per row, the context
        starts at position 0, and ``mask`` is ``block_mask`` of those anchors.
        """
        S, Q, _ = x.shape
        start = cache.offset if cache is not None else 0  # absolute position of ctx[:, 0]
        starts = start + ctx.shape[1] if anchors is None else anchors
        q = self._rope_blocks(self._heads(self.q_proj(x), self.n_heads, self.q_norm), rope, starts)
        k_ctx = rope(self._heads(self.k_proj(ctx), self.n_kv_heads, self.k_norm), offset=start)
        v_ctx = self._heads(self.v_proj(ctx), self.n_kv_heads)
        k_blk = self._rope_blocks(self._heads(self.k_proj(x), self.n_kv_heads, self.k_norm), rope, starts)
        v_blk = self._heads(self.v_proj(x), self.n_kv_heads)
        if cache is not None:
            k_ctx, v_ctx = cache.update_and_fetch(k_ctx, v_ctx)
        if anchors is None:
            C = k_ctx.shape[2]
            if self.window is not None and C > self.window - 1:  # only the window's context keys matter
                k_ctx, v_ctx = k_ctx[..., C - self.window + 1 :, :], v_ctx[..., C - self.window + 1 :, :]
                C = self.window - 1
            if self.window is not None or self.causal:
                mask = mx.array(block_mask(np.array([[C]]), C, Q, self.window, self.causal))
        keys = mx.concatenate([k_ctx, k_blk], axis=2)
        values = mx.concatenate([v_ctx, v_blk], axis=2)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(S, Q, -1))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig, layer_type: str):
        super().__init__()
        self.self_attn = DraftAttention(cfg, layer_type)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, ctx, rope, cache=None, anchors=None, mask=None):
        h = x + self.self_attn(self.input_layernorm(x), ctx, rope, cache, anchors, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class ReducedHead:
    """A reduced draft vocabulary's target ids, built once per ``d2t`` table, and the target
    head's rows of them, gathered once per target model and table."""

    def __init__(self):
        self.d2t = self.ids = self.model = self.rows_of = self.rows = None

    def target_ids(self, d2t: mx.array) -> mx.array:
        if self.d2t is not d2t:
            self.d2t, self.ids = d2t, (mx.arange(d2t.size) + d2t).astype(mx.int32)
        return self.ids

    def __call__(self, model: nn.Module, d2t: mx.array, h: mx.array) -> mx.array:
        ids = self.target_ids(d2t)
        if self.model is not model or self.rows_of is not ids:
            self.model, self.rows_of, self.rows = model, ids, target.head_rows(model, ids)
        return self.rows(h)


class DFlashDraft(nn.Module):
    """The drafter's own weights (no embedding, no head: those are the target's)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layers = [DraftLayer(cfg, t) for t in cfg.layer_types]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rope = initialize_rope(
            cfg.head_dim,
            base=cfg.rope_theta,
            traditional=False,
            scaling_config=cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings,
        )

        if cfg.draft_vocab_size is not None:
            self.d2t = mx.zeros((cfg.draft_vocab_size,), dtype=mx.int64)
            self.freeze(keys=["d2t"], recurse=False)
        self.reduced_head = ReducedHead()  # a plain object: not a parameter, not a child module

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]

    def draft_ids(self) -> Optional[mx.array]:
        """The target ids the head covers (in draft id order), or None for the full vocabulary."""
        if self.config.draft_vocab_size is None:
            return None
        return self.reduced_head.target_ids(self.d2t)

    def head(self, model: nn.Module, h: mx.array) -> mx.array:
        """Logits over the drafter's vocabulary: the target's head (restricted to ``draft_ids``),
        then ``output_multiplier`` and ``final_logit_softcapping``."""
        if self.config.draft_vocab_size is None:
            return self.finish_logits(target.lm_head(model, h))
        return self.finish_logits(self.reduced_head(model, self.d2t, h))

    def embed(self, model: nn.Module, tokens: mx.array) -> mx.array:
        """Block embeddings: the target's, times ``input_embedding_scale``."""
        h = target.embed(model, tokens)
        return h * self.config.input_embedding_scale if self.config.input_embedding_scale != 1.0 else h

    def finish_logits(self, logits: mx.array) -> mx.array:
        """``output_multiplier``, then ``final_logit_softcapping``, as the config defines them."""
        cfg = self.config
        if cfg.output_multiplier != 1.0:
            logits = logits * cfg.output_multiplier
        if cfg.final_logit_softcapping:
            logits = mx.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    def __call__(self, block_embeddings: mx.array, context_hidden: mx.array, cache=None, anchors=None) -> mx.array:
        """Normalised hidden states of the block positions.

        Decoding: ``block_embeddings`` are the target embeddings of ``[last, MASK, ...]``
        ``(1, B, H)``; ``context_hidden`` the concatenated target layer outputs of the
        context positions not yet seen by the drafter ``(1, S, len(ids) * H)``, appended
        to ``cache``. Training: ``anchors`` ``(S, nb)`` (numpy) place ``nb`` blocks per row
        of ``block_embeddings`` ``(S, nb*B, H)``, each seeing the context before its anchor.
        """
        ctx = self.hidden_norm(self.fc(context_hidden))
        h = block_embeddings
        masks, starts = {}, None
        if anchors is not None:
            starts = mx.array(anchors.astype(np.int32))
            B = h.shape[1] // anchors.shape[1]
            for a in (layer.self_attn for layer in self.layers):
                if (a.window, a.causal) not in masks:
                    masks[a.window, a.causal] = mx.array(block_mask(anchors, ctx.shape[1], B, a.window, a.causal))
        for layer, c in zip(self.layers, cache if cache is not None else [None] * len(self.layers)):
            a = layer.self_attn
            h = layer(h, ctx, self.rope, c, starts, masks.get((a.window, a.causal)))
        return self.norm(h)

    def propose(self, model: nn.Module, block: mx.array, context_hidden: mx.array, cache) -> mx.array:
        """Draft logits ``(B - 1, V_draft)`` over the drafter's vocabulary (``draft_ids``) for block
        positions 1.., with the target's embedding and head."""
        h = self(self.embed(model, block), context_hidden, cache)
        return self.head(model, h[0, 1:])


class Drafter(Protocol):
    """What decoding needs of a drafter: ``DFlashDraft``, and the test and benchmark
    drafters of ``mlx_blockpilot.bench.drafters``."""

    config: DraftConfig

    def make_cache(self) -> List[Any]:
        """A fresh context cache (objects with ``offset``, ``trim`` and ``is_trimmable``)."""

    def draft_ids(self) -> Optional[mx.array]:
        """The target ids of the drafter's vocabulary (the columns of ``propose``'s logits), or
        None when it is the target's whole vocabulary."""

    def propose(self, model: nn.Module, block: mx.array, context_hidden: Optional[mx.array], cache: List[Any]) -> mx.array:
        """Draft logits ``(B - 1, V_draft)`` over the drafter's vocabulary for ``block`` =
        ``[[last, MASK, ...]]`` after reading ``context_hidden`` (the committed context not seen
        yet) into ``cache``. The drafter never proposes a token outside its vocabulary; the
        target, which verifies over its whole vocabulary, supplies those."""


def target_tokens(ids: Optional[mx.array], choices: mx.array) -> mx.array:
    """The target ids of draft-vocabulary indices ``choices`` (``ids``: a drafter's ``draft_ids()``)."""
    return choices if ids is None else ids[choices]


def read_draft_config(path: str | Path) -> Tuple[DraftConfig, Dict[str, Any]]:
    """The drafter's config (parsed and raw) from a z-lab layout directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise BlockPilotError(f"no drafter config.json in {path}; pass a DFlash drafter directory")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockPilotError(f"cannot read drafter config {cfg_file}: {e}") from None
    return DraftConfig.from_dict(raw), raw


def load_draft(path: str | Path) -> DFlashDraft:
    """Load a drafter from a z-lab layout directory (config.json + *.safetensors)."""
    path = Path(path)
    cfg, cfg_dict = read_draft_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BlockPilotError(f"no *.safetensors weights in drafter directory {path}")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError for bad files
            raise BlockPilotError(f"cannot read drafter weights {f}: {e}") from None
    model = DFlashDraft(cfg)
    quant = cfg_dict.get("quantization")
    if quant:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: isinstance(m, nn.Linear) and f"{p}.scales" in weights,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BlockPilotError(f"drafter weights in {path} do not match its config.json: {e}") from None
    mx.eval(model.parameters())
    ids = model.draft_ids()
    if ids is not None:
        ids = ids.tolist()
        if not (0 <= ids[0] and ids[-1] < cfg.vocab_size and all(a < b for a, b in zip(ids, ids[1:]))):
            raise BlockPilotError(
                f"drafter {path}: d2t must map draft ids to increasing target ids below {cfg.vocab_size}"
            )
    model.eval()
    return model


def save_draft(draft: DFlashDraft, out, config: Optional[Dict[str, Any]] = None) -> None:
    """Write ``draft`` as a z-lab drafter: ``config.json`` (``config``, default the drafter's
    own) + ``model.safetensors``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(draft.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config or draft.config.to_dict(), indent=2) + "\n")
