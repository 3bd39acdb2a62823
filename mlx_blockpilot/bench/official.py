"""The official z-lab MLX backend (``dflash.model_mlx``) as a benchmark row, when installed."""

from pathlib import Path

import mlx.core as mx

from ..bundle import load_target
from ..draft import read_draft_config


def load_official(target_dir, draft_dir):
    """``(model_mlx module, its own target copy, its drafter)``, or None when dflash is not installed.

    The official backend wraps the layers of the model it is given, so it gets a
    separately loaded target. Its ``load_draft`` only takes hub repo ids, so the drafter
    is built here with its own classes from the local config and weights. It does not read
    a reduced vocabulary (``d2t``): such a drafter runs there with the full head, the same
    layers drafting over every token (a speed reference; outputs stay the target's).
    """
    try:
        from dflash import model_mlx
    except ImportError:
        return None
    model, _ = load_target(target_dir)
    cfg, raw = read_draft_config(draft_dir)
    dflash = raw.get("dflash_config") or {}
    config = model_mlx.DFlashConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        block_size=cfg.block_size, target_layer_ids=tuple(cfg.target_layer_ids), num_target_layers=cfg.num_target_layers,
        mask_token_id=cfg.mask_token_id, rope_scaling=cfg.rope_scaling, layer_types=tuple(cfg.layer_types),
        sliding_window=cfg.sliding_window, is_causal=cfg.is_causal,
        final_logit_softcapping=dflash.get("final_logit_softcapping"),
        input_embedding_scale=float(dflash.get("input_embedding_scale", 1.0)),
        output_multiplier=float(dflash.get("output_multiplier", 1.0)),
    )
    draft = model_mlx.DFlashDraftModel(config)
    draft.eval()
    draft.load_weights([(k, v) for f in sorted(Path(draft_dir).glob("*.safetensors"))
                        for k, v in mx.load(str(f)).items() if k != "d2t"])
    mx.eval(draft.parameters())
    return model_mlx, model, draft
