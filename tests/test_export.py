"""Export to vLLM / SGLang: files in the z-lab and Hugging Face layouts that load back exactly.

Neither engine installs here (they need CUDA), so the files are tested, not the engines:
our own loader and the official DFlash MLX loader read them back.
"""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import write_draft
from test_decode import make_prompt, no_eos, reference

from mlx_blockpilot import load
from mlx_blockpilot.cli.export import main
from mlx_blockpilot.conversion import convert
from mlx_blockpilot.decode import generate
from mlx_blockpilot.demo import find_gguf
from mlx_blockpilot.draft import load_draft
from mlx_blockpilot.errors import BlockPilotError
from mlx_blockpilot.exporter import Export, launch_command

ZLAB_KEYS = {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
             "layers.0.self_attn.q_norm.weight", "layers.0.mlp.gate_proj.weight", "layers.0.input_layernorm.weight"}


@pytest.fixture(scope="module")
def bundle_dir(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_draft(root / "d", llama.cfg, llama.mask_id, target_layer_ids=(0, 2, 3), num_layers=1,
                draft_ids=range(0, llama.cfg["vocab_size"], 2))
    convert(llama.target_dir, root / "d", root / "bundle", verbose=False)
    return root / "bundle"


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_drafter_round_trip_and_launch_command(bundle_dir, llama, tmp_path, capsys, engine):
    out = tmp_path / "exp"
    code, printed, err = run_main(capsys, bundle_dir, "--to", engine, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "draft", "export.json", "serve.sh"]  # HF target: referenced
    info = json.loads((out / "export.json").read_text())
    assert info["target"] == str(llama.target_dir.resolve()) and info["block_size"] == 16
    flags = "--speculative-num-draft-tokens 16" if engine == "sglang" else '"num_speculative_tokens": 15'
    assert flags in info["command"] and info["command"] in (out / "serve.sh").read_text() and flags in printed
    cfg = json.loads((out / "draft" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["draft_vocab_size"] == llama.cfg["vocab_size"] // 2
    assert cfg["dflash_config"]["target_layer_ids"] == [0, 2, 3] and "quantization" not in cfg
    weights = mx.load(str(out / "draft" / "model.safetensors"))
    assert ZLAB_KEYS <= set(weights) and weights["d2t"].dtype == mx.int64
    assert all(v.dtype == mx.bfloat16 for k, v in weights.items() if k != "d2t")
    # the exported drafter decodes exactly like the bundle's (bf16 changes drafts, not outputs)
    bundle = load(bundle_dir)
    prompt = make_prompt(11, seed=4)
    ref = reference(bundle.model, prompt, max_tokens=24)
    back = load_draft(out / "draft")
    assert back.draft_ids().tolist() == bundle.draft.draft_ids().tolist()
    assert generate(bundle.model, back, no_eos(bundle.tokenizer), prompt, block_size=4, max_tokens=24).tokens == ref


def test_official_loader_reads_the_exported_drafter(llama, tmp_path, monkeypatch, capsys):
    official = pytest.importorskip("dflash.model_mlx", reason="pip install --no-deps dflash==0.1.0")
    write_draft(tmp_path / "d", llama.cfg, llama.mask_id, target_layer_ids=(0, 2, 3), num_layers=2)
    convert(llama.target_dir, tmp_path / "d", tmp_path / "bundle", verbose=False, draft_q_bits=8)
    out = tmp_path / "exp"
    assert run_main(capsys, tmp_path / "bundle", "--to", "vllm", "--out", out, "--dtype", "float32")[0] == 0
    ours = load_draft(out / "draft")
    monkeypatch.setattr(official, "snapshot_download", lambda repo, **kw: str(repo))
    theirs = official.load_draft(str(out / "draft")).bind(llama.model)
    assert all(v.dtype == mx.float32 for v in mx.load(str(out / "draft" / "model.safetensors")).values())
    from mlx_blockpilot import target

    seq = make_prompt(30, seed=2)
    _, hidden = target.forward(llama.model, mx.array([seq[:20]]), official.make_prompt_cache(llama.model), (0, 2, 3))
    block = mx.array([[seq[20]] + [llama.mask_id] * 5])
    a = ours.propose(llama.model, block, hidden, ours.make_cache())
    b = theirs(block, hidden, theirs.make_cache(), logits_start=1)[0]
    assert float(mx.abs(a - b).max()) < 1e-4
    # the 8-bit bundle drafter was dequantized: the export computes what the bundle computed
    bundle = load(tmp_path / "bundle")
    c = bundle.draft.propose(llama.model, block, hidden, bundle.draft.make_cache())
    assert float(mx.abs(a - c).max()) < 1e-4


@pytest.mark.slow
def test_gguf_target_is_written_in_hugging_face_layout(tmp_path, capsys):
    """SmolLM2's GGUF keeps Q/K rows in interleaved-RoPE order: the export reorders them for
    Hugging Face's RoPE, and the reloaded target decodes exactly as the bundle's."""
    from mlx_blockpilot.bundle import load_target

    smol = dict(hidden_size=576, vocab_size=49152, num_hidden_layers=30, rope_theta=100000.0, max_position_embeddings=8192)
    write_draft(tmp_path / "d", smol, mask_token_id=0, target_layer_ids=(1, 28), num_layers=1, block_size=4)
    convert(find_gguf(), tmp_path / "d", tmp_path / "bundle", dtype="float32", verbose=False)
    out = tmp_path / "exp"
    assert run_main(capsys, tmp_path / "bundle", "--to", "sglang", "--out", out, "--dtype", "float32")[0] == 0
    cfg = json.loads((out / "target" / "config.json").read_text())
    assert "rope_traditional" not in cfg and cfg["torch_dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (out / "target").iterdir()}
    model, tok = load_target(out / "target")
    bundle = load(tmp_path / "bundle")
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True))
    assert reference(model, ids, max_tokens=16) == reference(bundle.model, ids, max_tokens=16)
    assert "./target" in json.loads((out / "export.json").read_text())["command"]


def test_bad_input_leaves_nothing(bundle_dir, tmp_path, capsys):
    cases = [
        ([tmp_path / "nope", "--to", "vllm", "--out", tmp_path / "o"], "does not exist"),
        ([bundle_dir, "--to", "tgi", "--out", tmp_path / "o"], "invalid choice"),
        ([bundle_dir, "--to", "vllm", "--out", tmp_path / "o", "--dtype", "int4"], "invalid choice"),
    ]
    for argv, match in cases:
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = run_main(capsys, bundle_dir, "--to", "vllm", "--out", tmp_path / "taken")
    assert code == 2 and "--force" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken.")]


def test_block_size_one_is_not_a_server():
    with pytest.raises(BlockPilotError, match="plain decoding"):
        launch_command("vllm", "t", "d", 1)
    assert "--speculative-num-draft-tokens 4" in launch_command("sglang", "t", "d", 4)
    assert '"num_speculative_tokens": 3' in launch_command("vllm", "t", "d", 4)


def test_recommended_block_size_skips_plain_decoding_picks(bundle_dir):
    from mlx_blockpilot.exporter import readme, recommend_block_size, routing

    bundle = load(bundle_dir)
    assert bundle.policy is None and routing(bundle) == ""  # no policy: no routing recipe that needs one
    block, reason = recommend_block_size(bundle, [make_prompt(9, seed=1)])
    assert block == bundle.draft.config.block_size and "no policy" in reason
    assert "route each request" not in readme(Export("vllm", block, reason, "t", Path("draft"), "cmd"), bundle, "bfloat16")


def test_export_leaves_the_bundle_as_it_was(bundle_dir, tmp_path):
    from mlx.utils import tree_flatten

    from mlx_blockpilot.exporter import export

    bundle = load(bundle_dir)
    before = {k: v.dtype for k, v in tree_flatten(bundle.draft.parameters())}
    (tmp_path / "exp").mkdir()
    export(bundle, tmp_path / "exp", "vllm", dtype="bfloat16")
    assert {k: v.dtype for k, v in tree_flatten(bundle.draft.parameters())} == before
    assert mx.float32 in before.values()
