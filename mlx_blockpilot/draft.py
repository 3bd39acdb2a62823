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
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3 import MLP
from mlx_lm.models.rope_utils import initialize_rope

from . import target
from .errors import BlockPilotError


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

    def __post_init__(self):
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

    @classmethod
    def from_dict(cls, cfg: Dict[str, Any]) -> "DraftConfig":
        """Read a z-lab ``config.json`` (``dflash_config`` keys win over top-level ones)."""
        dflash = cfg.get("dflash_config") or {}
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        merged = dict(cfg)
        merged["rope_theta"] = cfg.get("rope_theta") or (rope or {}).get("rope_theta", 1e6)
        merged["rope_scaling"] = rope
        merged["block_size"] = dflash.get("block_size", cfg.get("block_size", 16))
        for key in ("target_layer_ids", "mask_token_id"):
            if key in dflash:
                merged[key] = dflash[key]
        if "target_layer_ids" not in merged and "aux_hidden_state_layer_ids" in cfg:
            merged["target_layer_ids"] = [i - 1 for i in cfg["aux_hidden_state_layer_ids"]]
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
        out["architectures"] = ["DFlashDraftModel"]
        out["model_type"] = "qwen3"
        out["dflash_config"] = {
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
        }
        return out


class DraftAttention(nn.Module):
    """Qwen3-style attention whose keys are [context, block] and queries the block."""

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

    def __call__(self, x, ctx, rope, cache: KVCache):
        L = x.shape[1]
        start = cache.offset  # absolute position of the first new context token
        q = rope(self._heads(self.q_proj(x), self.n_heads, self.q_norm), offset=start + ctx.shape[1])
        k_ctx = rope(self._heads(self.k_proj(ctx), self.n_kv_heads, self.k_norm), offset=start)
        v_ctx = self._heads(self.v_proj(ctx), self.n_kv_heads)
        k_blk = rope(self._heads(self.k_proj(x), self.n_kv_heads, self.k_norm), offset=start + ctx.shape[1])
        v_blk = self._heads(self.v_proj(x), self.n_kv_heads)
        k_ctx, v_ctx = cache.update_and_fetch(k_ctx, v_ctx)
        S = k_ctx.shape[2]
        if self.window is not None and S > self.window - 1:
            k_ctx, v_ctx = k_ctx[..., S - self.window + 1 :, :], v_ctx[..., S - self.window + 1 :, :]
            S = self.window - 1
        keys = mx.concatenate([k_ctx, k_blk], axis=2)
        values = mx.concatenate([v_ctx, v_blk], axis=2)
        mask = self._mask(S, L)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(x.shape[0], L, -1))

    def _mask(self, S: int, L: int) -> Optional[mx.array]:
        """Context keys within the sliding window; block keys all (or causally) visible."""
        if self.window is None and not self.causal:
            return None
        # Positions relative to the first kept context key: context 0..S-1, block S..S+L-1.
        q_pos = S + mx.arange(L)[:, None]
        k_pos = mx.arange(S + L)[None]
        visible = mx.ones((L, S + L), dtype=mx.bool_)
        if self.window is not None:
            visible = (k_pos >= S) | (q_pos - k_pos < self.window)
        if self.causal:
            visible = visible & (k_pos <= q_pos)
        return visible


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig, layer_type: str):
        super().__init__()
        self.self_attn = DraftAttention(cfg, layer_type)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, ctx, rope, cache):
        h = x + self.self_attn(self.input_layernorm(x), ctx, rope, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


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

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]

    def __call__(self, block_embeddings: mx.array, context_hidden: mx.array, cache) -> mx.array:
        """Normalised hidden states of the block.

        ``block_embeddings``: target embeddings of ``[last, MASK, ...]`` ``(1, B, H)``.
        ``context_hidden``: concatenated target layer outputs of the context positions
        not yet seen by the drafter ``(1, S, len(ids) * H)``; appended to ``cache``.
        """
        ctx = self.hidden_norm(self.fc(context_hidden))
        h = block_embeddings
        for layer, c in zip(self.layers, cache):
            h = layer(h, ctx, self.rope, c)
        return self.norm(h)

    def propose(self, model: nn.Module, block: mx.array, context_hidden: mx.array, cache) -> mx.array:
        """Draft logits ``(B - 1, V)`` for block positions 1.. with the target's embedding and head."""
        h = self(target.embed(model, block), context_hidden, cache)
        return target.lm_head(model, h[0, 1:])


def read_draft_config(path: str | Path) -> Tuple[DraftConfig, Dict[str, Any]]:
    """The drafter's config (parsed and raw) from a z-lab layout directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise BlockPilotError(f"no drafter config.json in {path}; pass a DFlash drafter directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
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
    model.eval()
    return model
