"""Hugging Face sources: resolve a local directory or a hub repo id, convert a target.

A repo id is fetched with ``huggingface_hub.snapshot_download`` into the normal
HF cache (with its progress bars); with ``HF_HUB_OFFLINE=1`` only the cache is
used. Target conversion is mlx-lm's own (``mlx_lm.convert.convert``), so the
result is exactly what ``mlx_lm.convert`` would write and ``mlx_lm.load`` reads.
"""

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from safetensors import SafetensorError, safe_open

from mlx_blockpilot.dtypes import check_dtype, check_quantization
from mlx_blockpilot.errors import BlockPilotError

PathLike = Union[str, Path]

# "org/name" as the hub spells repo ids (no leading slash, no dots-only parts).
_REPO_ID = re.compile(r"^(?!\.)[\w.-]+/(?!\.)[\w.-]+$")


def is_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and ".." not in src


def resolve(src: PathLike, what: str, allow_patterns: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Locate ``src`` on disk; download it first when it is a hub repo id.

    Returns ``{"path": Path, "kind": "local" | "hf-repo", ...}`` with the repo id
    and snapshot revision for hub sources (recorded in the bundle manifest).
    """
    path = Path(src).expanduser()
    if path.exists():
        return {"path": path, "kind": "local", "source": str(path.resolve())}
    if not is_repo_id(str(src)):
        raise BlockPilotError(
            f"{what} {src} does not exist; give a local path or a Hugging Face repo id (org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(str(src), allow_patterns=list(allow_patterns) if allow_patterns else None))
    except LocalEntryNotFoundError:
        raise BlockPilotError(
            f"{what} {src} is neither a local path nor in the Hugging Face cache, and downloads "
            "are off (HF_HUB_OFFLINE=1 or no network); download it first or give a local path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BlockPilotError(f"cannot fetch {what} {src} from the Hugging Face hub ({first})") from None
    return {"path": local, "kind": "hf-repo", "source": str(src), "revision": local.name}


def read_config(path: PathLike, what: str = "target") -> Dict[str, Any]:
    """``config.json`` of an HF-layout directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise BlockPilotError(f"no config.json in {what} directory {path}; pass a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise BlockPilotError(f"cannot read {cfg_file}: {e}") from None
    if not isinstance(cfg, dict):
        raise BlockPilotError(f"{cfg_file} does not hold a JSON object")
    return cfg


def convert_target(
    src: PathLike,
    out_dir: PathLike,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """Convert an HF-layout target directory into the mlx-lm directory ``out_dir`` (must not exist).

    Uses ``mlx_lm.convert.convert``: weights cast to ``dtype`` (default: the
    checkpoint's ``torch_dtype``), optionally quantized to ``q_bits`` with
    ``q_group_size``; tokenizer files and ``generation_config.json`` copied.
    Returns facts for the manifest.
    """
    from mlx_lm.convert import convert

    check_dtype(dtype)
    if quantize:
        check_quantization(q_bits, q_group_size, "target")
    src, out_dir = Path(src), Path(out_dir)
    if quantize and "quantization" in read_config(src):
        raise BlockPilotError(f"target {src} is already quantized; drop --quantize or give a full-precision checkpoint")
    try:
        convert(
            str(src),
            mlx_path=str(out_dir),
            quantize=quantize,
            q_bits=q_bits if quantize else None,
            q_group_size=q_group_size if quantize else None,
            dtype=dtype,
        )
    except BlockPilotError:
        raise
    except Exception as e:  # mlx-lm raises many kinds for unreadable checkpoints
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BlockPilotError(f"cannot convert target {src}: {first}") from None
    return target_facts(out_dir)


def target_facts(path: PathLike) -> Dict[str, Any]:
    """Manifest facts of a written mlx-lm directory (from its config.json)."""
    cfg = read_config(path)
    text = cfg.get("text_config", cfg)
    quant = cfg.get("quantization")
    return {
        "model_type": cfg.get("model_type"),
        "hidden_size": text.get("hidden_size"),
        "vocab_size": text.get("vocab_size"),
        "num_layers": text.get("num_hidden_layers"),
        "dtype": weights_dtype(path),
        "quantization": {"bits": quant["bits"], "group_size": quant["group_size"]} if quant else None,
    }


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def weights_dtype(path: PathLike) -> Optional[str]:
    """The most common float dtype among the safetensors in ``path`` (headers only)."""
    counts: Counter = Counter()
    for f in sorted(Path(path).glob("*.safetensors")):
        counts.update(d for d in _tensor_dtypes(f) if d in SAFETENSORS_DTYPES)
    return SAFETENSORS_DTYPES[counts.most_common(1)[0][0]] if counts else None


def _tensor_dtypes(file: Path) -> List[str]:
    """The safetensors dtype name ("F32", "BF16", ...) of each tensor in ``file``."""
    try:
        with safe_open(str(file), framework="numpy") as f:
            return [f.get_slice(name).get_dtype() for name in f.keys()]
    except SafetensorError as e:
        raise BlockPilotError(f"cannot read {file}: {e}") from None


def find_files(directory: PathLike, suffixes: Sequence[str]) -> List[Path]:
    """Files under ``directory`` (recursively) with one of ``suffixes``, sorted."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
