"""Convert a llama.cpp GGUF file (llama, qwen2, qwen3) into an mlx-lm model directory.

The GGUF is read with ``mx.load``, which returns Q4_0 / Q4_1 / Q8_0 tensors already
in MLX's affine format (uint32 ``weight`` + float16 ``scales`` / ``biases``, group
size 32). Those are either kept quantized (with an mlx-lm ``quantization`` config,
per-module where the bits differ) or dequantized. The tokenizer is rebuilt as a
byte-level BPE ``tokenizers`` tokenizer from the GGUF vocabulary and merges.
"""

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import numpy as np

from mlx_blockpilot.dtypes import check_dtype
from mlx_blockpilot.errors import BlockPilotError

GROUP_SIZE = 32  # every GGUF block quantization MLX reads uses 32-element blocks

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


TOP_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer split patterns by ``tokenizer.ggml.pre`` (the same ones the
# Hugging Face tokenizer.json files use); unknown values fall back to GPT-2's.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = {"qwen2": QWEN2_PATTERN, "llama-bpe": LLAMA3_PATTERN}
IGNORE_MERGES = {"llama-bpe"}
DIGIT_SPLIT = {"smollm", "starcoder"}

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def convert_gguf(
    src: Union[str, Path],
    out_dir: Union[str, Path],
    dtype: Optional[str] = None,
    dequantize: bool = False,
) -> dict:
    """Write an mlx-lm model directory for the GGUF file ``src`` into ``out_dir``.

    Quantized tensors stay quantized unless ``dequantize`` is set, in which case
    they are dequantized to ``dtype`` (default float32). Otherwise ``dtype`` only
    casts the non-quantized tensors. ``out_dir`` must be an existing directory.
    Returns facts for a manifest: architecture, model_type, quantization
    (``{"bits", "group_size"}`` or None), vocab_size and num_layers.
    """
    target = _check_dtype(dtype, dequantize)
    out = _check_out_dir(out_dir)
    tensors, meta = _read(Path(src))
    arch = _architecture(meta, src)

    rope_freqs = tensors.pop("rope_freqs.weight", None)
    config = _model_config(meta, arch, tensors)
    if rope_freqs is not None and not mx.allclose(rope_freqs, 1.0).item():
        config["rope_scaling"] = _llama3_rope_scaling(
            rope_freqs.tolist(), config["head_dim"], config["rope_theta"]
        )
    weights, bits, plain = _convert_weights(tensors, dequantize, target)
    quantization = _quantization_config(bits, plain)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    tokenizer, tokenizer_config = _tokenizer(meta, config)
    generation_config = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
    }
    _write(
        out,
        {
            "model.safetensors": lambda p: mx.save_safetensors(
                str(p), weights, metadata={"format": "mlx"}
            ),
            "config.json": _json_writer(config),
            "generation_config.json": _json_writer(generation_config),
            "tokenizer.json": lambda p: p.write_text(tokenizer.to_str(), encoding="utf-8"),
            "tokenizer_config.json": _json_writer(tokenizer_config),
        },
    )
    return {
        "architecture": arch,
        "model_type": config["model_type"],
        "quantization": (
            {"bits": quantization["bits"], "group_size": quantization["group_size"]}
            if quantization
            else None
        ),
        "vocab_size": config["vocab_size"],
        "num_layers": config["num_hidden_layers"],
    }


def _check_dtype(dtype: Optional[str], dequantize: bool) -> Optional[mx.Dtype]:
    if dtype is None:
        return mx.float32 if dequantize else None
    return check_dtype(dtype)


def _check_out_dir(out_dir: Union[str, Path]) -> Path:
    out = Path(out_dir)
    if not out.is_dir():
        raise BlockPilotError(f"Output directory {out} does not exist; create it first.")
    taken = [name for name in OUTPUT_FILES if (out / name).exists()]
    if taken:
        raise BlockPilotError(
            f"Output directory {out} already holds {', '.join(taken)}; pass an empty directory."
        )
    return out


def read_model_config(src: Union[str, Path]) -> dict:
    """The HF-style model config of a GGUF file, checked, without converting its weights."""
    path = Path(src)
    tensors, meta = _read(path)
    return _model_config(meta, _architecture(meta, path), tensors)


def _read(path: Path):
    """Load tensors and metadata (as plain Python values) from a GGUF file."""
    if not path.is_file():
        raise BlockPilotError(f"GGUF file {path} does not exist; pass the path of a .gguf file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BlockPilotError(
            f"{path} is not a GGUF file (no GGUF header); pass a llama.cpp .gguf model file."
        )
    try:
        tensors, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as e:
        raise BlockPilotError(
            f"Cannot read GGUF file {path} ({e}): it is truncated or corrupt, or uses a "
            "quantization MLX cannot load (only F32, F16, BF16, Q4_0, Q4_1 and Q8_0); "
            "re-download it or use a file with one of those types."
        ) from e
    return tensors, {k: _plain(v) for k, v in meta.items()}


def _plain(value: Any) -> Any:
    if not isinstance(value, mx.array):
        return value
    if value.ndim > 0:
        return value.tolist()
    if mx.issubdtype(value.dtype, mx.floating):
        return float(str(np.float32(value.item())))  # shortest float32 repr: 1e-05
    return value.item()


def _architecture(meta: dict, src) -> str:
    arch = meta.get("general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise BlockPilotError(
            f"GGUF file {src} has architecture {arch!r}, which is not supported; "
            f"convert a {', '.join(HF_ARCHITECTURES)} model instead."
        )
    return arch


def _model_config(meta: dict, arch: str, tensors: Dict[str, mx.array]) -> dict:
    """Build an HF-style config.json for mlx-lm from the GGUF hyperparameters."""

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values: only uniform ones are supported
            if len(set(value)) != 1:
                raise BlockPilotError(
                    f"GGUF key {arch}.{key} varies per layer ({value}), which mlx-lm's "
                    f"{arch} model does not support; use a model with uniform layers."
                )
            value = value[0]
        if value is None:
            raise BlockPilotError(
                f"GGUF file lacks {arch}.{key}; re-export it with a current llama.cpp."
            )
        return value

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise BlockPilotError(
            f"GGUF model rotates {rope_dim} of {head_dim} head dimensions (partial RoPE), "
            f"which mlx-lm's {arch} model does not support."
        )
    config = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        # llama.cpp permutes llama Q/K rows for interleaved (GPT-J style) RoPE.
        config["rope_traditional"] = True
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    scaling = _rope_scaling(meta, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(_special_ids(meta))
    return config


def _rope_scaling(meta: dict, arch: str) -> Optional[dict]:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", 1.0)
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    raise BlockPilotError(
        f"GGUF model uses {kind!r} RoPE scaling, which this converter does not support; "
        "use a model without RoPE scaling or with linear scaling."
    )


def _llama3_rope_scaling(factors: List[float], head_dim: int, base: float) -> dict:
    """Recover a llama3 ``rope_scaling`` from GGUF ``rope_freqs`` (per-frequency divisors).

    llama.cpp stores 1 for high frequencies, ``factor`` for low ones and a smooth
    blend between. The blend is linear in 1/wavelength, which fixes the
    parameters up to a common scale, so ``low_freq_factor`` is set to 1.
    """
    f = np.asarray(factors, dtype=np.float64)
    factor = float(f.max())
    wavelen = 2 * math.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if len(f) != head_dim // 2 or factor <= 1 or mid.sum() < 2:
        raise BlockPilotError(
            "GGUF rope_freqs do not follow the llama3 RoPE scaling rule; "
            "this converter cannot reproduce them in mlx-lm."
        )
    smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[mid], smooth, 1)
    high = 1 - 1 / intercept
    old_len = -slope / intercept
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(f"{high:.6g}"),
        "original_max_position_embeddings": float(f"{old_len:.6g}"),
    }
    if not np.allclose(_llama3_divisors(scaling, wavelen), f, rtol=1e-3):
        raise BlockPilotError(
            "GGUF rope_freqs do not follow the llama3 RoPE scaling rule; "
            "this converter cannot reproduce them in mlx-lm."
        )
    return scaling


def _llama3_divisors(scaling: dict, wavelen: np.ndarray) -> np.ndarray:
    """The per-frequency divisors mlx-lm's Llama3RoPE applies for ``scaling``."""
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_len = scaling["original_max_position_embeddings"]
    smooth = (old_len / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > old_len / low, factor, 1.0)
    return np.where((wavelen > old_len / high) & (wavelen < old_len / low), blend, out)


def _special_ids(meta: dict) -> dict:
    ids = {}
    for name, key in (("bos", "bos"), ("pad", "padding")):
        if (value := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            ids[f"{name}_token_id"] = value
    eos = [meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    if eos:
        ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return ids


def _hf_module(module: str) -> str:
    """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj``."""
    if module in TOP_MODULES:
        return TOP_MODULES[module]
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_MODULES:
        return f"model.layers.{parts[1]}.{LAYER_MODULES[parts[2]]}"
    raise BlockPilotError(
        f"GGUF tensor {module!r} has no place in mlx-lm's model; the file holds an "
        "unsupported model variant."
    )


def _convert_weights(tensors: Dict[str, mx.array], dequantize: bool, dtype):
    """Rename tensors to HF names; dequantize or keep the quantized triplets.

    Returns the weights, the bits of each kept-quantized module, and the
    matrices (Linear / Embedding candidates) left unquantized.
    """
    weights, bits, plain = {}, {}, []
    for name, w in tensors.items():
        module, kind = name.rsplit(".", 1)
        if kind in ("scales", "biases"):
            continue
        hf = _hf_module(module)
        scales = tensors.get(f"{module}.scales")
        if scales is None:
            weights[f"{hf}.{kind}"] = w if dtype is None else w.astype(dtype)
            if kind == "weight" and w.ndim == 2:
                plain.append(hf)
            continue
        b = w.shape[-1] // scales.shape[-1]
        biases = tensors[f"{module}.biases"]
        if dequantize:
            w = mx.dequantize(
                w,
                scales.astype(mx.float32),
                biases.astype(mx.float32),
                group_size=GROUP_SIZE,
                bits=b,
            )
            weights[f"{hf}.weight"] = w.astype(dtype)
        else:
            weights.update({f"{hf}.weight": w, f"{hf}.scales": scales, f"{hf}.biases": biases})
            bits[hf] = b
    return weights, bits, plain


def _quantization_config(bits: Dict[str, int], plain: List[str]) -> Optional[dict]:
    """mlx-lm ``quantization``: the most common bits, plus per-module exceptions."""
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    config = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, b in sorted(bits.items()):
        if b != default:
            config[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    for module in sorted(plain):
        config[module] = False
    return config


def _tokenizer(meta: dict, config: dict):
    """Rebuild a byte-level BPE tokenizer and its tokenizer_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pre

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise BlockPilotError(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use a model with a byte-level BPE tokenizer such as SmolLM2, Llama 3 or Qwen."
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)

    name = meta.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=name in IGNORE_MERGES))
    if name in SPLIT_PATTERNS:
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(Regex(SPLIT_PATTERNS[name]), behavior="isolated"),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif name in DIGIT_SPLIT:
        tok.pre_tokenizer = pre.Sequence(
            [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    added = [
        AddedToken(t, special=ty == TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos_id = config.get("bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    eos_ids = config.get("eos_token_id")
    if isinstance(eos_ids, list):
        eos_ids = eos_ids[0]
    for name, i in (
        ("bos_token", bos_id),
        ("eos_token", eos_ids),
        ("pad_token", config.get("pad_token_id")),
        ("unk_token", meta.get("tokenizer.ggml.unknown_token_id")),
    ):
        if i is not None:
            tokenizer_config[name] = tokens[i]
    if template := meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = template
    return tok, tokenizer_config


def _json_writer(data: dict):
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return lambda p: p.write_text(text, encoding="utf-8")


def _write(out: Path, files: dict) -> None:
    """Write every file, or none: remove the ones already written on failure."""
    written = []
    try:
        for name, write in files.items():
            path = out / name
            written.append(path)
            write(path)
    except BaseException as e:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BlockPilotError(f"Cannot write the converted model into {out} ({e}).") from e
        raise
