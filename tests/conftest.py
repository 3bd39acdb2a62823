"""Shared tiny models: written once per session into a temporary directory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import write_draft, write_target  # noqa: E402


class Tiny:
    """A written target + drafter pair and their loaded objects."""

    def __init__(self, root: Path, arch: str, **draft_kwargs):
        from mlx_lm import load

        from mlx_blockpilot.draft import load_draft

        self.target_dir = root / f"{arch}_target"
        self.draft_dir = root / f"{arch}_draft"
        self.cfg = write_target(self.target_dir, arch)
        self.model, self.tokenizer = load(str(self.target_dir))
        self.mask_id = self.tokenizer.convert_tokens_to_ids("<|mask|>")
        self.draft_cfg = write_draft(self.draft_dir, self.cfg, self.mask_id, **draft_kwargs)
        self.draft = load_draft(self.draft_dir)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Calibrations and demo bundles go to a session folder, never the user's cache."""
    import os

    old = os.environ.get("MLX_BLOCKPILOT_CACHE")
    os.environ["MLX_BLOCKPILOT_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("MLX_BLOCKPILOT_CACHE", None)
    else:
        os.environ["MLX_BLOCKPILOT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def qwen3(tiny_root):
    return Tiny(tiny_root, "qwen3")


@pytest.fixture(scope="session")
def llama(tiny_root):
    return Tiny(tiny_root, "llama", target_layer_ids=(0, 2, 3), num_layers=1)


@pytest.fixture(scope="session", params=["qwen3", "llama"])
def tiny(request):
    return request.getfixturevalue(request.param)
