"""The sweep file: what ``sweep`` writes and ``train_policy`` reads.

``OUT.jsonl`` holds one ``meta`` line, one ``prompt`` line per prompt (written once its
features are saved) and one ``run`` line per (prompt, block size). Features go to
``OUT.features/<prompt id>.safetensors`` (float16): ``logits`` (the target's logits at
the last prompt token, as the engine hands them to the policy) and optionally
``hidden`` (the target's hidden state at the last prompt token, output of the deepest
layer the drafter taps).
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import BlockPilotError

FEATURES = ("logits", "hidden")
# Settings that must agree between a sweep file and a run that resumes it.
META_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "chat", "refine", "vocab_size", "hidden_size",
             "feature_layer", "features")
META_DEFAULTS = {"top_p": 1.0, "top_k": 0}  # for files written before these were recorded
# What each kind of record must hold.
RECORD_KEYS = {
    "meta": ("features", "vocab_size", "hidden_size"),
    "prompt": ("id", "features"),
    "run": ("prompt_id", "block_size", "mean_acceptance", "decode_tokens_per_s"),
}


def check_features(names: Sequence[str]) -> list:
    """The feature kinds to save, in file order; ``logits`` is always among them."""
    bad = [f for f in names if f not in FEATURES]
    if bad or "logits" not in names:
        raise BlockPilotError(f"features must be 'logits' or 'logits,hidden', got {','.join(names)!r}")
    return [f for f in FEATURES if f in names]


def prompt_id(tokens: Sequence[int]) -> str:
    return hashlib.sha1(json.dumps(list(tokens)).encode()).hexdigest()[:16]


def features_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".features")


def read_sweep(path) -> Tuple[Optional[Dict[str, Any]], Dict[str, Dict], Dict[Tuple[str, int], Dict]]:
    """(meta, prompts by id, runs by (prompt id, block size)) of a sweep file.

    A last line cut short by an interruption is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise BlockPilotError(f"sweep file {path} does not exist")
    meta, prompts, runs = None, {}, {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise BlockPilotError(f"{path} is not UTF-8 text; is this a sweep file?") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # interrupted while writing
            raise BlockPilotError(f"line {i + 1} of {path} is not valid JSON; is this a sweep file?") from None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        missing = [k for k in RECORD_KEYS.get(kind, ()) if k not in rec]
        if kind not in RECORD_KEYS or missing:
            why = f"lacks {', '.join(missing)}" if missing else "is not a sweep record"
            raise BlockPilotError(f"line {i + 1} of {path} {why}; is this a sweep file?")
        if kind == "meta":
            meta = rec
        elif kind == "prompt":
            prompts[rec["id"]] = rec
        else:
            runs[(rec["prompt_id"], rec["block_size"])] = rec
    if meta is None and (prompts or runs):
        raise BlockPilotError(f"{path} has no meta line; is this a sweep file?")
    return meta, prompts, runs


def load_features(path, prompt: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The saved features of one ``prompt`` record of the sweep file at ``path``."""
    f = Path(path).parent / prompt["features"]
    if not f.is_file():
        raise BlockPilotError(f"features file {f} of prompt {prompt['id']} is missing; re-run the sweep")
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()}


def append(f, rec: Dict[str, Any]) -> None:
    """Write one record line and flush it (a crash loses at most the line being written)."""
    f.write(json.dumps(rec) + "\n")
    f.flush()


def open_for_append(out: Path):
    """Open ``out`` for appending, dropping a last line cut short by an interruption."""
    if out.exists():
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(out, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(out, "a", encoding="utf-8")
