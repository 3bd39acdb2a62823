"""Convert a target + drafter (+ policy) into one MLX bundle (``python -m mlx_blockpilot.convert``).

Sources: local Hugging Face-layout directories or hub repo ids (fetched into the
HF cache; ``HF_HUB_OFFLINE=1`` uses the cache alone), a ``.gguf`` file for the
target, a ``.pt`` / ``.safetensors`` checkpoint (or a converted policy directory)
for the policy. Every compatibility check runs before anything is written; the
bundle is written into a temporary directory next to ``--out`` and renamed at the
end, so a failed or interrupted conversion leaves nothing behind.
"""

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .bundle import TargetFacts, check_draft, check_out_dir, check_policy, write_bundle, write_manifest
from .errors import BlockPilotError

HF_TARGET_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
DRAFT_PATTERNS = ["*.json", "*.safetensors"]
POLICY_PATTERNS = ["*.json", "*.safetensors", "*.pt", "*.pth", "*.bin"]
POLICY_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)


# --- sources -----------------------------------------------------------------


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_target(src) -> Dict[str, Any]:
    """Where the target is and in which format (``hf`` or ``gguf``)."""
    from .converters.hf import resolve

    info = resolve(src, "target", HF_TARGET_PATTERNS)
    path = info["path"]
    if path.is_file():
        if not (path.suffix.lower() == ".gguf" or _is_gguf(path)):
            raise BlockPilotError(
                f"target {path} is a file but not a GGUF model; give a .gguf file or a Hugging Face model directory"
            )
        info["format"] = "gguf"
    elif not (path / "config.json").is_file() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        info["path"], info["format"] = ggufs[0], "gguf"
    else:
        info["format"] = "hf"
    return info


def target_facts(info: Dict[str, Any]) -> TargetFacts:
    """Hidden size, vocabulary and layers of a target source, read without converting it."""
    from .target import SUPPORTED_MODEL_TYPES

    if info["format"] == "gguf":
        from .converters import gguf

        return TargetFacts.from_config(gguf.read_model_config(info["path"]))
    from .converters.hf import read_config

    cfg = read_config(info["path"])
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BlockPilotError(
            f"target {info['source']} has model type {model_type!r}, which is not supported; "
            f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return TargetFacts.from_config(cfg)
    except KeyError as e:
        raise BlockPilotError(f"target config.json in {info['path']} lacks {e.args[0]!r}") from None


def resolve_draft(src) -> Dict[str, Any]:
    from .converters.hf import resolve

    info = resolve(src, "drafter", DRAFT_PATTERNS)
    if not info["path"].is_dir():
        raise BlockPilotError(f"drafter {info['path']} is not a directory; give a DFlash drafter directory (z-lab layout)")
    return info


def resolve_policy(src) -> Dict[str, Any]:
    """A policy checkpoint file, or a directory already in bundle format (``format: "dir"``)."""
    from .converters.hf import find_files, resolve
    from .policy import ARCHITECTURE

    info = resolve(src, "policy", POLICY_PATTERNS)
    path = info["path"]
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file() and _json_field(cfg, "architecture") == ARCHITECTURE:
            info["format"] = "dir"
            return info
        files = find_files(path, POLICY_SUFFIXES)
        if len(files) != 1:
            found = ", ".join(str(f.relative_to(path)) for f in files[:5]) or "none"
            raise BlockPilotError(
                f"policy directory {path} should hold one .pt or .safetensors checkpoint (found: {found}); "
                "give the checkpoint file itself"
            )
        info["path"] = files[0]
    info["format"] = "checkpoint"
    return info


def _json_field(path: Path, key: str):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def policy_config(info: Dict[str, Any], block_sizes, input_kind: str):
    """The policy's ``PolicyConfig`` (reads and checks the checkpoint, writes nothing)."""
    from .policy import PolicyConfig

    if info["format"] == "dir":
        cfg_file = info["path"] / "config.json"
        try:
            return PolicyConfig.from_dict(json.loads(cfg_file.read_text()))
        except (OSError, ValueError) as e:
            if isinstance(e, BlockPilotError):
                raise
            raise BlockPilotError(f"cannot read policy config {cfg_file}: {e}") from None
    from .converters.blockpilot import policy_config_from_state_dict, read_state_dict

    return policy_config_from_state_dict(read_state_dict(info["path"]), block_sizes, input_kind)


def _check_not_inside(out: Path, sources: Dict[str, Dict[str, Any]]) -> None:
    """Refuse to --force-replace a directory that holds one of the sources."""
    if not out.exists():
        return
    root = out.resolve()
    for what, info in sources.items():
        if info is not None and info["kind"] == "local":
            src = info["path"].resolve()
            if src == root or root in src.parents:
                raise BlockPilotError(f"--out {out} holds the {what} source {src}; choose another --out")


# --- conversion --------------------------------------------------------------


def convert(
    target,
    draft,
    out,
    policy=None,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    draft_q_bits: Union[int, str, None] = "auto",
    policy_q_bits: Optional[int] = None,
    policy_block_sizes: Optional[Sequence[int]] = None,
    policy_input_kind: str = "logits",
    dtype: Optional[str] = None,
    force: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Convert the sources into the bundle directory ``out``; returns its manifest.

    ``draft_q_bits="auto"`` quantizes the drafter like the target (``q_bits``
    when ``quantize``), ``None`` keeps it in full precision. A GGUF target keeps
    its own quantization unless ``dtype`` is given (dequantize) or ``quantize``
    (dequantize, then quantize with mlx-lm).
    """
    from .dtypes import check_dtype, check_quantization
    from .policy import INPUT_KINDS

    check_dtype(dtype)
    if quantize:
        check_quantization(q_bits, q_group_size, "target")
    if draft_q_bits == "auto":
        draft_q_bits = q_bits if quantize else None
    if draft_q_bits is not None:
        check_quantization(draft_q_bits, q_group_size, "drafter")
    if policy_input_kind not in INPUT_KINDS:
        raise BlockPilotError(f"policy input kind must be one of {', '.join(INPUT_KINDS)}, got {policy_input_kind!r}")
    out = check_out_dir(out, force)

    # 1. Find every source (downloading hub repos) and check them all before writing.
    _log(verbose, f"target: {target}")
    t_info = resolve_target(target)
    facts = target_facts(t_info)
    _log(verbose, f"drafter: {draft}")
    d_info = resolve_draft(draft)
    checks = _check_draft(facts, d_info["path"])
    p_info = pcfg = None
    if policy is not None:
        _log(verbose, f"policy: {policy}")
        p_info = resolve_policy(policy)
        if p_info["format"] == "dir" and policy_block_sizes is not None:
            raise BlockPilotError("a converted policy directory carries its own block sizes; drop --policy-block-sizes")
        pcfg = policy_config(p_info, policy_block_sizes, policy_input_kind)
        checks += _check_policy(facts, pcfg)
        if policy_q_bits is not None:
            check_quantization(policy_q_bits, q_group_size, "policy", pcfg.input_size)
            if pcfg.quantization is not None:
                raise BlockPilotError("the policy is already quantized; drop --policy-q-bits")
    _check_not_inside(out, {"target": t_info, "drafter": d_info, "policy": p_info})

    # 2. Write everything into a temporary directory, renamed to `out` at the end.
    with write_bundle(out, force) as tmp:
        _log(verbose, f"writing into {tmp}")
        t_facts = _write_target(t_info, tmp, quantize, q_bits, q_group_size, dtype, verbose)
        from .converters.dflash import convert_draft

        _log(verbose, "converting the drafter")
        d_facts = convert_draft(d_info["path"], tmp / "draft", q_bits=draft_q_bits, q_group_size=q_group_size, dtype=dtype)
        p_facts = None
        if p_info is not None:
            _log(verbose, "converting the policy")
            p_facts = _write_policy(p_info, tmp / "policy", policy_block_sizes, policy_input_kind, policy_q_bits, q_group_size, dtype)
        checks += _verify(tmp, facts)
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sources": {
                "target": _source(t_info),
                "draft": _source(d_info),
                "policy": _source(p_info) if p_info else None,
            },
            "options": {
                "quantize": quantize,
                "q_bits": q_bits if quantize else None,
                "q_group_size": q_group_size,
                "draft_q_bits": draft_q_bits,
                "policy_q_bits": policy_q_bits,
                "dtype": dtype,
            },
            "quantization": {
                "target": t_facts["quantization"],
                "draft": d_facts["quantization"],
                "policy": p_facts["quantization"] if p_facts else None,
            },
            "target": t_facts,
            "draft": d_facts,
            "policy": p_facts,
            "checks": checks,
        }
        write_manifest(tmp, manifest)
    _log(verbose, f"wrote {out}")
    return json.loads((out / "blockpilot.json").read_text())


def _check_draft(facts: TargetFacts, path: Path) -> List[str]:
    from .draft import read_draft_config

    cfg = read_draft_config(path)[0]
    check_draft(facts, cfg)
    return [
        f"drafter hidden size {cfg.hidden_size} == target hidden size {facts.hidden_size}",
        f"drafter vocab size {cfg.vocab_size} == target vocab size {facts.vocab_size}",
        f"drafter num_target_layers {cfg.num_target_layers} == target layers {facts.num_layers}",
        f"drafter target_layer_ids {list(cfg.target_layer_ids)} within target layers 0..{facts.num_layers - 1}",
        f"drafter mask_token_id {cfg.mask_token_id} within vocabulary 0..{facts.vocab_size - 1}",
    ]


def _check_policy(facts: TargetFacts, cfg) -> List[str]:
    check_policy(facts, cfg)
    want = facts.vocab_size if cfg.input_kind == "logits" else facts.hidden_size
    return [
        f"policy input size {cfg.input_size} == target {cfg.input_kind} size {want}",
        f"policy block sizes {list(cfg.block_sizes)} all >= 1",
    ]


def _write_target(info, tmp: Path, quantize, q_bits, q_group_size, dtype, verbose) -> Dict[str, Any]:
    from .converters.hf import convert_target, target_facts as written_facts

    out = tmp / "target"
    if info["format"] == "hf":
        _log(verbose, "converting the target with mlx-lm")
        return convert_target(info["path"], out, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size, dtype=dtype)
    from .converters.gguf import convert_gguf

    if not quantize:
        _log(verbose, "converting the GGUF target" + (f" (dequantized to {dtype})" if dtype else " (quantization kept)"))
        out.mkdir()
        convert_gguf(info["path"], out, dtype=dtype, dequantize=dtype is not None)
        return written_facts(out)
    # Requantize: dequantize the GGUF into a scratch directory, then quantize it with mlx-lm.
    _log(verbose, "dequantizing the GGUF target for requantization")
    scratch = tmp / ".gguf"
    scratch.mkdir()
    convert_gguf(info["path"], scratch, dtype=dtype or "float16", dequantize=True)
    facts = convert_target(scratch, out, quantize=True, q_bits=q_bits, q_group_size=q_group_size, dtype=dtype)
    shutil.rmtree(scratch)
    return facts


def _write_policy(info, out: Path, block_sizes, input_kind, q_bits, q_group_size, dtype) -> Dict[str, Any]:
    from .policy import load_policy, quantize_policy, save_policy

    if info["format"] == "checkpoint":
        from .converters.blockpilot import convert_policy

        out.mkdir()
        return convert_policy(
            info["path"], out, block_sizes=block_sizes, input_kind=input_kind,
            dtype=dtype or "float32", q_bits=q_bits, q_group_size=q_group_size,
        )
    policy = load_policy(info["path"])
    if q_bits is not None:
        quantize_policy(policy, q_bits, q_group_size)
    save_policy(policy, out)
    c = policy.config
    return {
        "input_kind": c.input_kind,
        "input_size": c.input_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "block_sizes": list(c.block_sizes),
        "dtype": str(policy.dtype).split(".")[-1],
        "quantization": dict(c.quantization) if c.quantization else None,
    }


def _verify(tmp: Path, facts: TargetFacts) -> List[str]:
    """Re-check the written bundle: the target builds in mlx-lm (lazily) and matches the source."""
    from mlx_lm.utils import load_model

    from .target import check_supported

    try:
        model, _ = load_model(tmp / "target", lazy=True)
    except Exception as e:  # mlx-lm raises many kinds for inconsistent checkpoints
        raise BlockPilotError(f"the converted target does not load in mlx-lm: {e}") from None
    check_supported(model)
    written = TargetFacts.from_model(model)
    if written != facts:
        raise BlockPilotError(f"the converted target ({written}) differs from its source ({facts})")
    _check_draft(written, tmp / "draft")
    if (tmp / "policy").is_dir():
        check_policy(written, policy_config({"format": "dir", "path": tmp / "policy"}, None, "logits"))
    return ["written target loads in mlx-lm with the source's hidden size, vocabulary and layers"]


def _source(info: Dict[str, Any]) -> Dict[str, Any]:
    out = {"source": info["source"], "kind": info["kind"]}
    if "format" in info:
        out["format"] = info["format"]
    if info["kind"] == "hf-repo":
        out["revision"] = info["revision"]
        out["file"] = str(info["path"]) if info["path"].is_file() else None
    return out


# --- CLI ---------------------------------------------------------------------
