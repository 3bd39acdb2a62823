"""The generate CLI: JSON output equals mlx-lm greedy; every bad input gets one clear error."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from fixtures import write_draft
from mlx_lm.generate import generate_step

from mlx_blockpilot.cli.generate import main


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_is_lossless_subprocess(qwen3):
    prompt = "the quick brown fox"
    cmd = [sys.executable, "-m", "mlx_blockpilot.generate", "--target", str(qwen3.target_dir),
           "--draft", str(qwen3.draft_dir), "--prompt", prompt, "--max-tokens", "24", "--block-size", "5", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ids = qwen3.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ref = []
    for tok, _ in generate_step(mx.array(ids), qwen3.model, max_tokens=24):
        ref.append(tok)
        if tok in qwen3.tokenizer.eos_token_ids:
            break
    assert data["tokens"] == ref
    for key in ("text", "prompt_tokens", "generation_tokens", "block_size", "acceptance_lengths",
                "mean_acceptance", "prefill_s", "decode_tokens_per_s"):
        assert key in data
    assert len(data["round_widths"]) == len(data["acceptance_lengths"])
    assert all(a <= w for a, w in zip(data["acceptance_lengths"], data["round_widths"]))
    assert data["prompt_tokens"] == len(ids) and data["block_size"] == 5
    assert data["generation_tokens"] == len(ref)


def test_streaming_text_and_no_chat_template(qwen3, capsys):
    code, out, err = run_main(capsys, "--target", qwen3.target_dir, "--draft", qwen3.draft_dir,
                              "--prompt", "hello world", "--max-tokens", "10", "--no-chat-template")
    assert code == 0
    ids = qwen3.tokenizer.encode("hello world")
    ref = [t for t, _ in generate_step(mx.array(ids), qwen3.model, max_tokens=10)]
    stop = next((i for i, t in enumerate(ref) if t in qwen3.tokenizer.eos_token_ids), None)
    ref = ref[:stop] if stop is not None else ref
    assert out.rstrip("\n") == qwen3.tokenizer.decode(ref)
    assert "tok/s" in err and "mean acceptance" in err


def bad_draft(tmp_path, qwen3, **kw):
    args = dict(mask_token_id=qwen3.mask_id)
    args.update(kw)
    write_draft(tmp_path / "bad", qwen3.cfg, **args)
    return tmp_path / "bad"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t, q: bad_draft(t, q, hidden_size=32), "hidden size"),
        (lambda t, q: bad_draft(t, q, vocab_size=999), "vocab size"),
        (lambda t, q: bad_draft(t, q, num_target_layers=7), "layers"),
        (lambda t, q: bad_draft(t, q, target_layer_ids=(1, 4)), "target_layer_ids"),
        (lambda t, q: bad_draft(t, q, mask_token_id=100000), "mask_token_id"),
        (lambda t, q: t / "missing", "does not exist"),
    ],
)
def test_incompatible_or_missing_drafter(qwen3, tmp_path, capsys, make, match):
    draft = make(tmp_path, qwen3)
    if match == "hidden size":  # fc/layers written for 64 but config says 32: config check must come first
        cfg = json.loads((draft / "config.json").read_text())
        assert cfg["hidden_size"] == 32
    code, out, err = run_main(capsys, "--target", qwen3.target_dir, "--draft", draft, "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_truncated_weights(qwen3, tmp_path, capsys):
    draft = bad_draft(tmp_path, qwen3)
    data = (draft / "model.safetensors").read_bytes()
    (draft / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_main(capsys, "--target", qwen3.target_dir, "--draft", draft, "--prompt", "hi")
    assert code == 2 and "error: " in err and "model.safetensors" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--block-size", "0"], "block size"),
        (["--temp", "-0.5"], "temperature"),
        (["--temp", "1", "--top-p", "0"], "top-p"),
        (["--temp", "1", "--top-p", "1.2"], "top-p"),
        (["--temp", "1", "--top-k", "-2"], "top-k"),
        (["--block-size", "auto"], "policy"),
        (["--temp", "nan"], "temperature must be a finite number"),
        (["--temp", "inf"], "temperature must be a finite number"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
        (["--seed", str(2**70)], "seed must be an integer in [0, 2**64)"),
        (["--block-size", "three"], "block size must be an integer or 'auto'"),
    ],
)
def test_bad_sampling_arguments(qwen3, capsys, extra, match):
    code, out, err = run_main(capsys, "--target", qwen3.target_dir, "--draft", qwen3.draft_dir, "--prompt", "hi", *extra)
    assert code == 2 and match in err and err.startswith("error: ") and err.count("\n") == 1


def test_empty_prompt_and_missing_target(qwen3, tmp_path, capsys):
    code, _, err = run_main(capsys, "--target", qwen3.target_dir, "--draft", qwen3.draft_dir, "--prompt", "  ")
    assert code == 2 and "empty" in err
    code, _, err = run_main(capsys, "--target", tmp_path / "nope", "--draft", qwen3.draft_dir, "--prompt", "hi")
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "--target", tmp_path / "empty", "--draft", qwen3.draft_dir, "--prompt", "hi")
    assert code == 2 and "config.json" in err


@pytest.mark.parametrize(
    "config, match",
    [
        ([1, 2, 3], "must be a JSON object"),
        ({"dflash_config": {"target_layer_ids": "1,3"}}, "target_layer_ids must be a list of integers"),
        ({"dflash_config": {"target_layer_ids": [1, 3], "mask_token_id": "5"}}, "mask_token_id must be an integer"),
        ({"dflash_config": []}, "dflash_config must be an object"),
        ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ],
)
def test_malformed_drafter_configs(qwen3, tmp_path, capsys, config, match):
    draft = bad_draft(tmp_path, qwen3)
    if isinstance(config, dict):
        cfg = json.loads((draft / "config.json").read_text())
        for key, value in config.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        config = cfg
    (draft / "config.json").write_text(json.dumps(config))
    code, out, err = run_main(capsys, "--target", qwen3.target_dir, "--draft", draft, "--prompt", "hi")
    assert code == 2 and out == "" and err.startswith("error: ") and match in err and err.count("\n") == 1


def test_prompt_that_is_not_utf8(qwen3):
    cmd = [sys.executable.encode(), b"-m", b"mlx_blockpilot.generate", b"--target", str(qwen3.target_dir).encode(),
           b"--draft", str(qwen3.draft_dir).encode(), b"--prompt", b"caf\xe9 \xff"]
    proc = subprocess.run(cmd, capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("error: ") and "UTF-8" in err and err.count("\n") == 1, err


def test_temperatures_too_small_to_divide_by_decode_greedily(qwen3):
    from mlx_blockpilot.decode import generate

    prompt = qwen3.tokenizer.encode("the quick brown fox")
    ref = [t for t, _ in generate_step(mx.array(prompt), qwen3.model, max_tokens=16)]
    for temp in (1e-46, 1e-30, 1e-6):
        r = generate(qwen3.model, qwen3.draft, qwen3.tokenizer, prompt, block_size=4, max_tokens=16, temperature=temp, seed=1)
        stop = next((i for i, t in enumerate(ref) if t in qwen3.tokenizer.eos_token_ids), len(ref) - 1)
        assert r.tokens == ref[: stop + 1], temp
