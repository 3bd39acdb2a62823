"""The bundle on disk (target/, draft/, policy/, blockpilot.json) and every compatibility check.

The same checks run when a bundle is converted and when anything is loaded.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import BlockPilotError

MANIFEST = "blockpilot.json"


@dataclass
class TargetFacts:
    """What the drafter and the policy must agree with."""

    hidden_size: int
    vocab_size: int
    num_layers: int

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "TargetFacts":
        cfg = cfg.get("text_config", cfg)
        return cls(cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"])

    @classmethod
    def from_model(cls, model) -> "TargetFacts":
        from . import target

        return cls(target.hidden_size(model), target.vocab_size(model), target.num_layers(model))


def check_draft(facts: TargetFacts, cfg) -> None:
    """Raise if a drafter config (``DraftConfig``) cannot run on this target."""
    if cfg.hidden_size != facts.hidden_size:
        raise BlockPilotError(
            f"drafter hidden size {cfg.hidden_size} does not match the target's {facts.hidden_size}; "
            "use the drafter trained for this target"
        )
    if cfg.vocab_size != facts.vocab_size:
        raise BlockPilotError(
            f"drafter vocab size {cfg.vocab_size} does not match the target's {facts.vocab_size}; "
            "use the drafter trained for this target"
        )
    if cfg.num_target_layers != facts.num_layers:
        raise BlockPilotError(
            f"drafter was trained for a target with {cfg.num_target_layers} layers, this target has "
            f"{facts.num_layers}; use the drafter trained for this target"
        )
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < facts.num_layers]
    if bad:
        raise BlockPilotError(
            f"drafter target_layer_ids {bad} are outside the target's layers 0..{facts.num_layers - 1}"
        )
    if not 0 <= cfg.mask_token_id < facts.vocab_size:
        raise BlockPilotError(
            f"drafter mask_token_id {cfg.mask_token_id} is outside the vocabulary (size {facts.vocab_size})"
        )


def check_policy(facts: TargetFacts, cfg) -> None:
    """Raise if a policy config (``PolicyConfig``) does not read this target's features."""
    want = facts.vocab_size if cfg.input_kind == "logits" else facts.hidden_size
    if cfg.input_size != want:
        raise BlockPilotError(
            f"policy reads {cfg.input_size} {cfg.input_kind} features but the target gives {want}; "
            "use a policy trained for this target"
        )
    if any(b < 1 for b in cfg.block_sizes):
        raise BlockPilotError(f"policy block sizes must be >= 1, got {cfg.block_sizes}")


@dataclass
class Bundle:
    """Everything needed to generate: target model + tokenizer, drafter, optional policy."""

    model: Any
    tokenizer: Any
    draft: Any
    policy: Any = None
    path: Optional[Path] = None

    @property
    def default_block_size(self):
        return "auto" if self.policy is not None else self.draft.config.block_size


def _need_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise BlockPilotError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise BlockPilotError(f"{what} {path} is not a directory")
    return path


def load_target(path):
    """Load an mlx-lm model directory; returns (model, tokenizer)."""
    from mlx_lm import load as mlx_lm_load

    from . import target

    path = _need_dir(Path(path), "target")
    if not (path / "config.json").is_file():
        raise BlockPilotError(f"no config.json in target directory {path}")
    try:
        model, tokenizer = mlx_lm_load(str(path))
    except Exception as e:  # mlx-lm raises many kinds for unreadable checkpoints
        raise BlockPilotError(f"cannot load target from {path}: {e}") from None
    target.check_supported(model)
    return model, tokenizer


def load(
    path=None,
    *,
    target=None,
    draft=None,
    policy=None,
) -> Bundle:
    """Load a converted bundle directory, or a target + drafter (+ policy) given apart."""
    from .draft import load_draft, read_draft_config
    from .policy import load_policy

    if path is not None:
        root = _need_dir(Path(path), "bundle")
        if not (root / MANIFEST).is_file():
            raise BlockPilotError(f"{root} is not a bundle (no {MANIFEST}); make one with python -m mlx_blockpilot.convert")
        target = target or root / "target"
        draft = draft or root / "draft"
        if policy is None and (root / "policy").is_dir():
            policy = root / "policy"
    if target is None or draft is None:
        raise BlockPilotError("give a bundle directory, or both a target and a drafter directory")
    model, tokenizer = load_target(target)
    facts = TargetFacts.from_model(model)
    draft = _need_dir(Path(draft), "drafter")
    check_draft(facts, read_draft_config(draft)[0])
    drafter = load_draft(draft)
    pol = None
    if policy is not None:
        pol = load_policy(_need_dir(Path(policy), "policy"))
        check_policy(facts, pol.config)
    return Bundle(model, tokenizer, drafter, pol, Path(path) if path is not None else None)


def read_manifest(path) -> Dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())
