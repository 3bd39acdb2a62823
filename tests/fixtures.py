"""Tiny checkpoints in the real on-disk layouts, written by the tests themselves.

- a byte-level BPE ``tokenizers`` tokenizer with ChatML special tokens;
- Hugging Face Qwen3 / Llama target directories (config.json + safetensors);
- z-lab DFlash drafter directories (config.json + safetensors, no embedding/head).
"""

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
from safetensors.numpy import save_file

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "speculative decoding drafts a block of tokens and verifies them at once",
    "hello world, this is a tiny tokenizer for tests 0123456789",
]


def write_tokenizer(path: Path, vocab_size: int = 320) -> Dict[str, int]:
    """Train a small byte-level BPE; write tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 4096,
            }
        )
    )
    ids["vocab"] = tok.get_vocab_size()
    return ids


def _normal(rng, shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def target_config(arch: str, vocab_size: int, **overrides) -> dict:
    cfg = dict(
        model_type=arch,
        architectures=["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=arch == "qwen3",
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def write_target(path: Path, arch: str = "qwen3", seed: int = 0, tokenizer: bool = True, **overrides) -> dict:
    """A random HF-layout target. Embeddings are large so greedy choices are well separated."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path)["vocab"] if tokenizer else overrides.pop("vocab_size")
    cfg = target_config(arch, overrides.pop("vocab_size", vocab), **overrides)
    rng = np.random.default_rng(seed)
    H, I, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    w = {"model.embed_tokens.weight": _normal(rng, (V, H), 1.0), "model.norm.weight": np.ones(H, np.float32)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = _normal(rng, (V, H), 0.5)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = _normal(rng, (nh * hd, H), H**-0.5)
        w[p + "self_attn.k_proj.weight"] = _normal(rng, (nkv * hd, H), H**-0.5)
        w[p + "self_attn.v_proj.weight"] = _normal(rng, (nkv * hd, H), H**-0.5)
        w[p + "self_attn.o_proj.weight"] = _normal(rng, (H, nh * hd), (nh * hd) ** -0.5)
        w[p + "mlp.gate_proj.weight"] = _normal(rng, (I, H), H**-0.5)
        w[p + "mlp.up_proj.weight"] = _normal(rng, (I, H), H**-0.5)
        w[p + "mlp.down_proj.weight"] = _normal(rng, (H, I), I**-0.5)
        w[p + "input_layernorm.weight"] = np.ones(H, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = np.ones(hd, np.float32)
            w[p + "self_attn.k_norm.weight"] = np.ones(hd, np.float32)
    save_file(w, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def write_draft(
    path: Path,
    target_cfg: dict,
    mask_token_id: int,
    target_layer_ids: Sequence[int] = (1, 3),
    num_layers: int = 2,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: Optional[int] = None,
    seed: int = 1,
    block_size: int = 16,
    draft_ids: Optional[Sequence[int]] = None,
    **overrides,
) -> dict:
    """A random z-lab-layout DFlash drafter for ``target_cfg`` (with ``draft_ids``: a reduced
    draft vocabulary, saved as ``draft_vocab_size`` + ``d2t``)."""
    path.mkdir(parents=True, exist_ok=True)
    H = target_cfg["hidden_size"]
    hd, nh, nkv, I = 16, 4, 2, 128
    cfg = dict(
        architectures=["DFlashDraftModel"],
        model_type="qwen3",
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=num_layers,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=hd,
        vocab_size=target_cfg["vocab_size"],
        rms_norm_eps=1e-6,
        rope_theta=target_cfg["rope_theta"],
        max_position_embeddings=target_cfg["max_position_embeddings"],
        num_target_layers=target_cfg["num_hidden_layers"],
        block_size=block_size,
        dflash_config={"target_layer_ids": list(target_layer_ids), "mask_token_id": mask_token_id, "block_size": block_size},
        tie_word_embeddings=False,
    )
    if layer_types is not None:
        cfg["layer_types"] = list(layer_types)
        cfg["sliding_window"] = sliding_window
    cfg.update(overrides)
    rng = np.random.default_rng(seed)
    w = {
        "fc.weight": _normal(rng, (H, len(target_layer_ids) * H), (len(target_layer_ids) * H) ** -0.5),
        "hidden_norm.weight": np.ones(H, np.float32),
        "norm.weight": np.ones(H, np.float32),
    }
    for i in range(num_layers):
        p = f"layers.{i}."
        w[p + "self_attn.q_proj.weight"] = _normal(rng, (nh * hd, H), H**-0.5)
        w[p + "self_attn.k_proj.weight"] = _normal(rng, (nkv * hd, H), H**-0.5)
        w[p + "self_attn.v_proj.weight"] = _normal(rng, (nkv * hd, H), H**-0.5)
        w[p + "self_attn.o_proj.weight"] = _normal(rng, (H, nh * hd), (nh * hd) ** -0.5)
        w[p + "self_attn.q_norm.weight"] = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
        w[p + "self_attn.k_norm.weight"] = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
        w[p + "mlp.gate_proj.weight"] = _normal(rng, (I, H), H**-0.5)
        w[p + "mlp.up_proj.weight"] = _normal(rng, (I, H), H**-0.5)
        w[p + "mlp.down_proj.weight"] = _normal(rng, (H, I), I**-0.5)
        w[p + "input_layernorm.weight"] = np.ones(H, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
    if draft_ids is not None:
        ids = np.array(sorted(draft_ids), np.int64)
        w["d2t"] = ids - np.arange(len(ids))
        cfg["draft_vocab_size"] = len(ids)
    save_file(w, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def write_unsupported_gguf(path: Path, arch: str = "mamba") -> Path:
    """A minimal GGUF file of an architecture the converter does not support."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
