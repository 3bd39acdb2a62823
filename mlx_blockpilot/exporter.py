"""A bundle for GPU servers: the drafter (and, when needed, the target) in Hugging Face layout,
a recommended block size and the launch command for vLLM or SGLang.

vLLM and SGLang read the drafter's original safetensors and ``config.json`` (z-lab layout);
MLX-quantized weights are not portable, so everything is written dequantized, in bfloat16
by default. Neither engine knows the BlockPilot policy: they take one block size per
server, so export recommends one (the policy's most frequent pick over sample prompts).
"""

import copy
import json
import shlex
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .bundle import read_manifest
from .draft import DFlashDraft, save_draft
from . import target
from .dtypes import check_dtype, dtype_name
from .errors import BlockPilotError

ENGINES = ("vllm", "sglang")
# Target families whose mlx-lm weight names and values are Hugging Face's (others need their HF source).
HF_WRITABLE = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class Export:
    engine: str
    block_size: int
    block_size_reason: str
    target: str  # what the server loads as the target: a path or a repo id
    draft: Path  # relative to the export folder
    command: str


def _float_copy(module: nn.Module, dtype) -> nn.Module:
    """A copy of ``module`` dequantized and cast to ``dtype`` (the bundle keeps its own weights)."""
    from mlx_lm.utils import dequantize_model

    module = copy.deepcopy(module)
    if any(type(m).__name__.startswith("Quantized") for m in module.modules()):  # Linear, Embedding, SwitchLinear
        module = dequantize_model(module)
    module.set_dtype(dtype, predicate=lambda t: mx.issubdtype(t, mx.floating))
    return module


def write_draft(draft: DFlashDraft, out: Path, dtype) -> None:
    """The drafter in the z-lab layout: float weights (dequantized) in ``dtype``, every
    ``dflash_config`` field, ``draft_vocab_size`` + ``d2t`` when the vocabulary is reduced."""
    draft = _float_copy(draft, dtype)
    config = draft.config.to_dict()
    config["torch_dtype"] = dtype_name(dtype)
    save_draft(draft, out, config)


def write_target(bundle_dir: Path, model, out: Path, dtype) -> None:
    """The target in Hugging Face layout and names: dequantized, ``dtype``, tokenizer files and
    chat template; Q/K rows reordered for Hugging Face's RoPE when the bundle used GGUF's."""
    config = json.loads((bundle_dir / "target" / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in HF_WRITABLE:
        raise BlockPilotError(
            f"the bundle's target ({kind}) was not converted from Hugging Face, and writing a {kind} target in "
            f"Hugging Face layout is not supported (only {', '.join(HF_WRITABLE)}); convert the bundle from the "
            "model's Hugging Face checkpoint, then export"
        )
    model = _float_copy(model, dtype)
    weights = dict(tree_flatten(model.parameters()))
    if config.pop("rope_traditional", False):
        hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        for name in list(weights):
            if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                weights[name] = target.half_split_rows(weights[name], hd)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = dtype_name(dtype)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        src = bundle_dir / "target" / name
        if src.is_file():
            shutil.copy(src, out / name)


def recommend_block_size(bundle, prompts: Optional[Sequence[List[int]]]) -> tuple:
    """(block size, why): the policy's most frequent pick over ``prompts``, else the drafter's
    training block size."""
    from . import decode
    from .cache import make_cache
    from .policy import choose_block_size

    if bundle.policy is not None and prompts:
        picks = []
        for p in prompts:
            pre = decode.prefill(bundle.model, bundle.draft, make_cache(bundle.model, bundle.draft), list(p))
            kind = bundle.policy.config.input_kind
            picks.append(choose_block_size(bundle.policy, decode.policy_features(bundle.model, bundle.draft, pre.logits,
                                                                                 pre.hidden, kind)))
        counts = Counter(picks)
        spread = ", ".join(f"{b}: {n}" for b, n in sorted(counts.items()))
        drafting = sorted(b for b in counts if b >= 2)  # a speculative server cannot decode plainly
        if drafting:
            best = max(drafting, key=lambda b: counts[b])
            return best, f"the policy's most frequent pick of 2 or more over {len(prompts)} prompts ({spread})"
        return (bundle.draft.config.block_size,
                f"the drafter's training block size (the policy chose plain decoding for all {len(prompts)} prompts)")
    return bundle.draft.config.block_size, "the drafter's training block size (no policy or no --prompts to ask it)"


def launch_command(engine: str, target_ref: str, draft_dir: Path, block_size: int) -> str:
    """The server command: vLLM counts drafted tokens (B - 1), SGLang the block (B)."""
    if block_size < 2:
        raise BlockPilotError("a block size of 1 is plain decoding; a speculative server needs 2 or more")
    if engine == "vllm":
        spec = json.dumps({"method": "dflash", "model": str(draft_dir), "num_speculative_tokens": block_size - 1})
        return f"vllm serve {shlex.quote(target_ref)} --speculative-config {shlex.quote(spec)}"
    return (f"python -m sglang.launch_server --model-path {shlex.quote(target_ref)} --speculative-algorithm DFLASH "
            f"--speculative-draft-model-path {shlex.quote(str(draft_dir))} --speculative-num-draft-tokens {block_size}")


def hf_source(bundle_dir: Path) -> Optional[str]:
    """The target's Hugging Face source (path or repo id) recorded in the manifest, if any."""
    source = (read_manifest(bundle_dir).get("sources") or {}).get("target") or {}
    if source.get("format") != "hf" or not source.get("source"):
        return None
    config = Path(source["source"]) / "config.json"
    if config.is_file() and "quantization" in json.loads(config.read_text()):
        return None  # an MLX-quantized folder: GPU engines cannot read it, so the target is written out
    return str(source["source"])


def export(bundle, out: Path, engine: str, dtype: str = "bfloat16",
           prompts: Optional[Sequence[List[int]]] = None) -> Export:
    """Write ``out/draft`` (and ``out/target`` when the bundle has no Hugging Face source),
    ``out/README.md``, ``out/serve.sh`` and ``out/export.json``; ``out`` must exist. The
    bundle itself is left as it was (the weights written are dequantized, cast copies)."""
    if engine not in ENGINES:
        raise BlockPilotError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    mx_dtype = check_dtype(dtype)
    bundle_dir = Path(bundle.path)
    block, reason = recommend_block_size(bundle, prompts)
    draft_dir = out / "draft"
    write_draft(bundle.draft, draft_dir, mx_dtype)
    source = hf_source(bundle_dir)
    if source is None:
        write_target(bundle_dir, bundle.model, out / "target", mx_dtype)
        target_ref = "./target"
    else:
        target_ref = source
    command = launch_command(engine, target_ref, Path("./draft"), block)  # relative: run from the export folder
    info = Export(engine, block, reason, target_ref, Path("draft"), command)
    (out / "serve.sh").write_text(f"#!/usr/bin/env sh\n# {engine}: {reason}\ncd \"$(dirname \"$0\")\"\n"
                                  f"exec {command} \"$@\"\n")
    (out / "serve.sh").chmod(0o755)
    (out / "export.json").write_text(json.dumps({
        "engine": engine, "block_size": block, "block_size_reason": reason, "target": target_ref,
        "draft": "draft", "dtype": dtype, "command": command, "bundle": str(bundle_dir.resolve()),
    }, indent=2) + "\n")
    (out / "README.md").write_text(readme(info, bundle, dtype))
    return info


def routing(bundle) -> str:
    """How to keep the policy's per-prompt pick with one-size servers (only for a bundle with a policy)."""
    if bundle.policy is None:
        return ""
    return f"""A server takes one block size. The BlockPilot policy picks one per prompt; to keep that, run
servers with different block sizes and route each request by the policy's pick:

```python
from mlx_blockpilot import chat_prompt, load
from mlx_blockpilot import decode
from mlx_blockpilot.cache import make_cache
from mlx_blockpilot.policy import choose_block_size

bundle = load("{Path(bundle.path).resolve()}")
ids = chat_prompt(bundle, [{{"role": "user", "content": "..."}}])
pre = decode.prefill(bundle.model, bundle.draft, make_cache(bundle.model, bundle.draft), ids)
features = decode.policy_features(bundle.model, bundle.draft, pre.logits, pre.hidden, bundle.policy.config.input_kind)
block_size = choose_block_size(bundle.policy, features)   # send the request to that server
```
"""


def readme(info: Export, bundle, dtype: str) -> str:
    cfg = bundle.draft.config
    vocab = (f" It drafts over a reduced vocabulary of {cfg.draft_vocab_size} tokens (`draft_vocab_size` + `d2t`): "
             "check that your engine version reads them." if cfg.draft_vocab_size else "")
    return f"""# Served with {info.engine}

Exported from the mlx_blockpilot bundle `{Path(bundle.path).resolve()}`.

- `draft/`: the DFlash drafter in the z-lab layout ({dtype}, dequantized), `architectures:
  ["DFlashDraftModel"]`, block size {cfg.block_size} in training, target layers
  {list(cfg.target_layer_ids)}, mask token {cfg.mask_token_id}.{vocab}
- target: `{info.target}`.
- block size: **{info.block_size}**, {info.block_size_reason}.

```sh
# from this folder
{info.command}
```

(`serve.sh` runs it from this folder.) vLLM counts the drafted tokens (`num_speculative_tokens` = block size - 1);
SGLang counts the whole block (`--speculative-num-draft-tokens` = block size).

{routing(bundle)}"""

